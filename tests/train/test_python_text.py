"""data=python_text: CPython's reference docs and standard-library sources as byte-level LM data,
read from this interpreter (no network), split by document, packed so every token is scored once."""

from __future__ import annotations

import socket

import pytest
import torch

from orchestrator.tasks.language_modeling import LanguageModeling
from orchestrator.zoo import python_text as pt
from orchestrator.zoo.python_text import PackedTokens, PythonTextError, python_text, split_of, split_streams

MODULES = ["abc", "bisect", "colorsys", "heapq", "keyword", "numbers", "shlex", "textwrap"]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("python_text opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_documents_never_straddle_splits_and_the_assignment_is_a_pure_function_of_the_name(no_network):
    streams = split_streams(pt.STDLIB_MODULES, docs=True)
    names = {split: set(docs) for split, (docs, _) in streams.items()}
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"]) and not (
        names["val"] & names["test"])
    every = names["train"] | names["val"] | names["test"]
    assert {f"module:{m}" for m in pt.STDLIB_MODULES} <= every
    assert sum(n.startswith("topic:") for n in every) >= 70  # the reference documentation's topics
    assert all(names["val"]) and names["test"]  # every split holds documents at the default fractions
    # each document's split is a function of its name alone: the same in any subset of documents
    small = split_streams(MODULES, docs=False)
    for split, (docs, _) in small.items():
        assert set(docs) <= names[split]
        assert all(split_of(n, 0.05, 0.05) == split for n in docs)
    # the hash is fixed (sha256): pinned values, the same on every machine
    assert [split_of(f"module:{m}", 0.05, 0.05) for m in ("doctest", "calendar", "abc")] == ["val", "test", "train"]


def test_each_split_is_its_documents_bytes_each_ended_by_nul(no_network):
    streams = split_streams(MODULES, docs=False, val_fraction=0.3, test_fraction=0.3)
    for split, (docs, stream) in streams.items():
        expected = b"".join((pt.stdlib_dir() / f"{n.split(':')[1]}.py").read_bytes() + b"\x00" for n in docs)
        assert bytes(stream.tolist()) == expected and docs == sorted(docs)
    again = split_streams(MODULES, docs=False, val_fraction=0.3, test_fraction=0.3)
    assert all(torch.equal(again[s][1], streams[s][1]) for s in streams)


def test_windows_overlap_by_one_token_so_every_token_but_the_first_is_scored_once():
    stream = torch.arange(23, dtype=torch.uint8)
    packed = PackedTokens(stream, seq_len=8)  # windows start at 0, 7, 14, 21
    assert len(packed) == 4 and packed.scored_tokens == 22
    targets = []
    for i in range(len(packed)):
        sample = packed[i]
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.shape == labels.shape == (8,) and ids.dtype == torch.long
        targets += [int(t) for t in labels[1:] if t != pt.IGNORE]  # what next-token prediction scores
    assert targets == list(range(1, 23))
    assert packed[3]["labels"].tolist() == [21, 22] + [pt.IGNORE] * 6  # the last window's padding is not scored
    with pytest.raises(IndexError):
        packed[4]
    # a subset keeps evenly spaced windows of the whole stream
    sub = PackedTokens(torch.arange(200, dtype=torch.uint8), seq_len=11, max_samples=4)  # 20 windows
    assert [int(sub[i]["input_ids"][0]) for i in range(4)] == [0, 50, 100, 150]
    assert sub.scored_tokens == 40


def test_perplexity_is_exact_per_token_over_the_split():
    """The language-modelling task's loss over the packed windows is the mean next-token NLL of
    the stream itself (one implementation: tasks/language_modeling.py)."""
    torch.manual_seed(0)
    stream = torch.randint(1, 256, (301,), dtype=torch.uint8)
    packed = PackedTokens(stream, seq_len=16)
    table = torch.randn(256, 256)  # a bigram "model": logits of the next token from this one
    task = LanguageModeling()
    sums = {"nll": 0.0, "tokens": 0.0}
    for i in range(len(packed)):
        batch = {k: v[None] for k, v in packed[i].items()}
        logits = table[batch["input_ids"]]
        for k, v in task.metric_sums(logits, task.targets(batch)).items():
            sums[k] += v
    direct = torch.nn.functional.cross_entropy(table[stream[:-1].long()], stream[1:].long(), reduction="sum")
    assert sums["tokens"] == 300
    assert task.compute_metrics(sums)["loss"] == pytest.approx(float(direct) / 300, rel=1e-5)


def test_the_data_group_gives_the_model_its_vocabulary_and_length(no_network):
    data = python_text(seq_len=64, modules=MODULES, docs=False, max_train_samples=10, max_eval_samples=3)
    assert dict(data.model_args) == {"vocab_size": 256, "max_length": 64}
    assert len(data.train) == 10 and len(data.val) <= 3 and len(data.test) <= 3
    assert data.train[0]["input_ids"].shape == (64,)


def test_bad_arguments_name_the_key():
    with pytest.raises(PythonTextError, match=r"data.args.modules: 'no_such_module' is not a single-file module"):
        python_text(modules=["no_such_module"])
    with pytest.raises(PythonTextError, match=r"data.args.val_fraction=1.5"):
        python_text(val_fraction=1.5)
    with pytest.raises(PythonTextError, match=r"data.args.seq_len=1"):
        python_text(seq_len=1, modules=MODULES)


def test_a_bad_sample_cap_names_its_key():
    with pytest.raises(PythonTextError, match=r"data.args.max_eval_samples=0 is not allowed"):
        python_text(modules=MODULES, docs=False, max_eval_samples=0)
