"""``python_text``: real English prose and real code that every Python install carries, as a
byte-level language-modelling dataset (no download, no tokenizer to train, nothing cached).

Documents
- CPython's reference documentation: every entry of ``pydoc_data.topics.topics`` (the text
  ``help("if")`` prints: the language reference's sections, ~80 topics, ~465 KB of English prose
  with code examples), one document per topic, named ``topic:<key>``;
- standard-library sources: the modules of ``STDLIB_MODULES`` (a fixed, sorted list of single-file
  modules chosen to exist from Python 3.9 to 3.14), read from the running interpreter's stdlib directory
  (``sysconfig.get_paths()["stdlib"]``), one document per file, named ``module:<name>``.

Splits: a document goes wholly to train, val or test by a hash of its name
(``sha256(name)`` as a fraction in [0, 1): below ``val_fraction`` val, below ``val_fraction +
test_fraction`` test, else train), so documents never straddle splits and the assignment is the
same on every machine and for every subset of documents.

Tokens: the UTF-8 bytes of the text, ids 0-255 (``vocab_size`` 256); byte 0 (NUL, which no
document contains) ends every document. Byte-level needs no training and no cache, its 256-row
embedding and head leave a small model's parameters to its transformer blocks (a BPE vocabulary
of 4-8 K would put most of a 1-3 M-parameter model in the embedding and head, whose quantization
would then dominate what is measured), and its perplexity is per byte: not comparable with
per-word or per-BPE-token perplexities of other datasets.

Packing: a split's documents, in name order, form one token stream; sample ``i`` is the ``seq_len``
tokens from ``i * (seq_len - 1)``: consecutive samples overlap by one token, so with next-token
prediction (``task=language_modeling``) every token of a split except its first is predicted
exactly once, and the split's perplexity is the exact per-token perplexity of its stream (the
last, shorter window is padded with -100 labels, not scored). Samples are dicts
``{"input_ids": [seq_len] int64, "labels": [seq_len] int64}``.

What differs across Python versions: the text itself. The same minor version (3.11.x) has the
same documents and, up to the small edits of patch releases, the same text; another minor version
rewrites parts of the documentation and the sources (so sizes, splits' token counts and
perplexities move), and a module missing from the interpreter is refused with its name. The split
of a given document never changes. ``python_text_info()`` reports the interpreter and token counts.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .datasets import DataSplits

VOCAB_SIZE = 256
END_OF_DOCUMENT = 0  # the NUL byte: in no document, appended to each
IGNORE = -100  # a label not scored (the padding of a split's last window)

# Single-file modules chosen to exist in CPython 3.9 to 3.14 (no packages, none of PEP 594's
# removals; checked on 3.11 here, from the release notes otherwise), sorted: the default
# ``modules`` of ``python_text``.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bdb", "bisect", "bz2", "calendar", "cmd", "code", "codecs", "codeop",
    "colorsys", "compileall", "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv",
    "dataclasses", "datetime", "difflib", "dis", "doctest", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "hmac", "imaplib", "inspect", "io", "ipaddress", "keyword", "linecache",
    "locale", "lzma", "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "operator", "optparse", "os",
    "pdb", "pickle", "pickletools", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile",
    "pstats", "pty", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "reprlib", "rlcompleter",
    "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib",
    "socket", "socketserver", "ssl", "stat", "statistics", "string", "stringprep", "struct", "subprocess",
    "symtable", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize",
    "trace", "traceback", "tracemalloc", "tty", "types", "typing", "uuid", "warnings", "wave", "weakref",
    "webbrowser", "zipapp", "zipimport",
)


class PythonTextError(ValueError):
    """A module that is not a single-file module of this interpreter's standard library."""


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` for the document ``name``: ``sha256(name)``'s first 8 bytes as
    a fraction ``u`` in [0, 1); ``u < val_fraction`` val, ``u < val_fraction + test_fraction`` test."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory (where ``os.py`` lives)."""
    return Path(sysconfig.get_paths()["stdlib"])


def documents(modules: Sequence[str] = STDLIB_MODULES, docs: bool = True) -> dict[str, str]:
    """``{name: text}``: the reference topics (``topic:<key>``, when ``docs``) and the ``modules``'
    sources (``module:<name>``), in name order."""
    out: dict[str, str] = {}
    if docs:
        from pydoc_data.topics import topics

        out.update({f"topic:{key}": text for key, text in topics.items()})
    root = stdlib_dir()
    for name in modules:
        path = root / f"{name}.py"
        if not path.is_file():
            raise PythonTextError(f"data.args.modules: {name!r} is not a single-file module of Python "
                                  f"{sys.version_info.major}.{sys.version_info.minor}'s standard library ({path} "
                                  "does not exist); allowed: names from orchestrator.zoo.python_text.STDLIB_MODULES")
        out[f"module:{name}"] = path.read_text(encoding="utf-8")
    for name, text in out.items():
        if "\x00" in text:  # the end-of-document byte must be unambiguous
            raise PythonTextError(f"document {name!r} contains a NUL byte, the end-of-document token")
    return dict(sorted(out.items()))


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` followed by ``END_OF_DOCUMENT``: ``[len + 1]`` uint8."""
    return torch.frombuffer(bytearray(text.encode("utf-8") + bytes([END_OF_DOCUMENT])), dtype=torch.uint8)


def decode(ids: torch.Tensor) -> str:
    """Token ids back to text (end-of-document bytes as newlines; invalid UTF-8 replaced)."""
    raw = bytes(int(i) for i in ids.tolist())
    return raw.replace(bytes([END_OF_DOCUMENT]), b"\n").decode("utf-8", errors="replace")


class PackedTokens(Dataset):
    """A token stream ``[T]`` read as windows of ``seq_len`` tokens at stride ``seq_len - 1``
    (``W = ceil((T - 1) / (seq_len - 1))`` windows; every token but the first is a target of exactly
    one). ``max_samples``: keep ``n`` of the ``W`` windows, evenly spaced (window ``floor(j * W / n)``
    for ``j < n``: every part of the stream, every document, is represented; null: all)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, max_samples: int | None = None,
                 key: str = "data.args.max_train_samples") -> None:
        if not (isinstance(seq_len, int) and seq_len >= 2):
            raise PythonTextError(f"data.args.seq_len={seq_len!r} is not allowed; allowed: an integer >= 2")
        if max_samples is not None and not (isinstance(max_samples, int) and max_samples >= 1):
            raise PythonTextError(f"{key}={max_samples!r} is not allowed; allowed: null or an integer >= 1")
        self.stream, self.seq_len = stream, seq_len
        self.windows = max(0, -(-(stream.numel() - 1) // (seq_len - 1)))
        self.size = self.windows if max_samples is None else min(self.windows, max_samples)

    def __len__(self) -> int:
        return self.size

    def window(self, i: int) -> int:
        """The index, among all ``W`` windows of the stream, of sample ``i``."""
        return i * self.windows // self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        start = self.window(i) * (self.seq_len - 1)
        window = self.stream[start:start + self.seq_len].long()
        ids = torch.full((self.seq_len,), END_OF_DOCUMENT, dtype=torch.long)
        labels = torch.full((self.seq_len,), IGNORE, dtype=torch.long)
        ids[:window.numel()] = window
        labels[:window.numel()] = window
        return {"input_ids": ids, "labels": labels}

    @property
    def scored_tokens(self) -> int:
        """Targets over all samples: each window's tokens after its first (``T - 1`` for all windows)."""
        return sum(min(self.seq_len, self.stream.numel() - self.window(i) * (self.seq_len - 1)) - 1
                   for i in range(self.size))


def split_streams(modules: Sequence[str] = STDLIB_MODULES, docs: bool = True, val_fraction: float = 0.05,
                  test_fraction: float = 0.05) -> dict[str, tuple[list[str], torch.Tensor]]:
    """``{split: (document names, token stream [T] uint8)}`` for train, val and test."""
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    texts = documents(modules, docs)
    for name in texts:
        parts[split_of(name, val_fraction, test_fraction)].append(name)
    return {split: (names, torch.cat([encode(texts[n]) for n in names]) if names
                    else torch.zeros(0, dtype=torch.uint8)) for split, names in parts.items()}


def python_text(seq_len: int = 128, modules: Sequence[str] | None = None, docs: bool = True,
                val_fraction: float = 0.05, test_fraction: float = 0.05, max_train_samples: int | None = 8000,
                max_eval_samples: int | None = 256) -> DataSplits:
    """Byte-level language modelling on CPython's reference docs and standard-library sources.

    ``modules``: standard-library module names (null: ``STDLIB_MODULES``, ~3.6 MB of code on 3.11);
    ``docs``: include the reference topics. ``max_train_samples`` / ``max_eval_samples``: keep that
    many windows of train / of val and test each, evenly spaced over the split's stream (null: all;
    perplexity stays exact over the tokens the kept windows predict). The defaults keep 8,000 of the
    ~28,000 training windows (~1 M of ~3.6 M tokens on Python 3.11: a baseline trains in minutes on
    one core) and 256 windows (~32 K tokens) of val and of test (an evaluation takes seconds).
    """
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise PythonTextError(f"data.args.{key}={value!r} is not allowed; allowed: a number in (0, 1)")
    if val_fraction + test_fraction >= 1:
        raise PythonTextError(f"data.args.val_fraction + test_fraction = {val_fraction + test_fraction!r} is not "
                              "allowed; allowed: below 1")
    streams = split_streams(STDLIB_MODULES if modules is None else list(modules), docs, val_fraction, test_fraction)
    limits = {"train": max_train_samples, "val": max_eval_samples, "test": max_eval_samples}
    keys = {"train": "data.args.max_train_samples", "val": "data.args.max_eval_samples",
            "test": "data.args.max_eval_samples"}
    sets = {split: PackedTokens(stream, seq_len, limits[split], keys[split]) for split, (_, stream) in streams.items()}
    return DataSplits(sets["train"], sets["val"], sets["test"],
                      model_args={"vocab_size": VOCAB_SIZE, "max_length": seq_len})


def python_text_info(modules: Sequence[str] = STDLIB_MODULES, docs: bool = True, val_fraction: float = 0.05,
                     test_fraction: float = 0.05) -> dict[str, object]:
    """The interpreter, and each split's documents and tokens (a record for benchmarks)."""
    streams = split_streams(modules, docs, val_fraction, test_fraction)
    return {"python": sys.version.split()[0], "stdlib": str(stdlib_dir()),
            **{f"{split}_documents": len(names) for split, (names, _) in streams.items()},
            **{f"{split}_tokens": int(stream.numel()) for split, (_, stream) in streams.items()}}
