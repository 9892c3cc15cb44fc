"""Where a trial's worker runs: in-process (``LocalSession``) or on Ray Train (``RaySession``).

A session tells the workflow its rank, world size and device, hands it the last checkpoint
state (or None) and takes per-epoch reports. Checkpoint *state* is a dict of tensors and
plain values (model + quantizer state, optimizer, scheduler, epoch, history); only rank 0's
state is persisted. A sharded strategy (FSDP) also passes a writer that every rank runs into
the checkpoint's directory (``shards/``, ``torch.distributed.checkpoint``); a loaded state then
names the complete shards directory under ``state["_shards"]``.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers only, so a file planted on shared storage cannot run code in a worker. A file that
would need more (a pickled object) is refused with ``CheckpointRefused``; a torn or truncated
one (an interrupted upload) is skipped for the next older checkpoint.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from ..fileio import atomic_write
from ..zoo.pretrained import load_failure

STATE_FILE = "trial_state.pt"
SHARDS_DIR = "shards"  # a sharded strategy's torch.distributed.checkpoint files, beside STATE_FILE


class CheckpointRefused(RuntimeError):
    """A checkpoint that holds more than tensors and plain values: it is not loaded."""


class CheckpointUnreadable(RuntimeError):
    """A torn, truncated or corrupt checkpoint file."""


def load_state(source: str | Path | bytes, where: str) -> dict[str, Any]:
    """A checkpoint state from a file path or its bytes, read with ``weights_only=True``.
    ``where`` names it in errors."""
    try:
        obj = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                         weights_only=True)
    except pickle.UnpicklingError as exc:
        planted, detail = load_failure(exc)
        if planted is not None:  # a class or function to import and call: what a code-carrying pickle needs
            raise CheckpointRefused(f"checkpoint {where} was refused: it asks to import and call Python objects "
                                    f"({planted}); only tensors and plain values are loaded, delete it if you "
                                    "did not write it") from None
        raise CheckpointUnreadable(f"checkpoint {where} is not a PyTorch checkpoint file ({detail})") from None
    except EOFError:
        raise CheckpointUnreadable(f"checkpoint {where} is empty or truncated") from None
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointUnreadable(f"checkpoint {where} is not readable: {first[:200]}") from None
    if not isinstance(obj, dict) or "epoch" not in obj:
        raise CheckpointUnreadable(f"checkpoint {where} is not a trial checkpoint (no epoch)")
    return obj


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device
    node_id: str  # where this worker runs (a Ray node id, or "local:<hostname>")

    def load_state(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None,
               write_shards: Callable[[Path], None] | None = None) -> None: ...


def shards_complete(directory: str | Path) -> bool:
    """True when ``directory`` holds a DCP checkpoint with every file its metadata names, whole."""
    from torch.distributed.checkpoint import FileSystemReader

    d = Path(directory)
    if not (d / ".metadata").is_file():
        return False
    try:
        storage = FileSystemReader(str(d)).read_metadata().storage_data or {}
    except Exception:  # a torn metadata file
        return False
    for info in storage.values():
        f = d / info.relative_path
        if not f.is_file() or f.stat().st_size < info.offset + info.length:
            return False
    return True


class LocalSession:
    """One in-process worker; checkpoints in ``<checkpoint_dir>/epoch_NNNN.pt``, newest ``keep`` kept."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_dir: str | Path, keep: int = 2, device: str | None = None,
                 on_report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.dir = Path(checkpoint_dir)
        self.keep = keep
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.on_report = on_report
        self.node_id = f"local:{socket.gethostname()}"

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("epoch_*.pt"))

    def load_state(self) -> dict[str, Any] | None:
        """The newest readable checkpoint (torn ones skipped); ``CheckpointRefused`` on a planted one."""
        for path in reversed(self._files()):
            try:
                return load_state(path, str(path))
            except CheckpointUnreadable:
                continue
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None,
               write_shards: Callable[[Path], None] | None = None) -> None:
        """Persist ``state`` (if any), then pass ``metrics`` to ``on_report`` (e.g. Ray Tune)."""
        if write_shards is not None:
            raise RuntimeError("a sharded checkpoint needs Ray Train workers (trainer.num_workers >= 2)")
        if state is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / f"epoch_{state['epoch']:04d}.pt", lambda tmp: torch.save(state, tmp))
            for old in self._files()[:-self.keep]:
                old.unlink(missing_ok=True)
        if self.on_report is not None:
            self.on_report(metrics)


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs an INFO line per report per worker on a logger named after the file
    path of its (private) context module, which its LoggingConfig does not reach."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def newest_state_in(root: str) -> dict[str, Any] | None:
    """The newest readable ``trial_state.pt`` under ``root/checkpoint_*`` (local path or URI).

    Ray Train 2.60 hands a restarted worker group no checkpoint when the worker failure is
    noticed before the controller consumed the last report; the checkpoint is on storage
    all the same. Torn uploads (unreadable files) are skipped; a file holding pickled objects
    raises ``CheckpointRefused``.
    """
    import pyarrow.fs as pafs

    try:
        fs, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except (OSError, ValueError):
        return None
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)
    for d in dirs:
        try:
            with fs.open_input_stream(f"{d}/{STATE_FILE}") as f:
                data = f.read()
        except OSError:  # missing: try the next older checkpoint
            continue
        try:
            state = load_state(data, f"{d}/{STATE_FILE}")
        except CheckpointUnreadable:  # torn: try the next older checkpoint
            continue
        if state.get("sharded"):
            shards = _local_shards(fs, f"{d}/{SHARDS_DIR}", local=isinstance(fs, pafs.LocalFileSystem))
            if shards is None:  # a rank's shards missing or torn: try the next older checkpoint
                continue
            state["_shards"] = shards
        return state
    return None


def _local_shards(fs, path: str, local: bool) -> str | None:
    """A local directory holding the complete shards at ``path`` (copied from remote storage), or None."""
    if not local:
        import pyarrow.fs as pafs

        target = tempfile.mkdtemp(prefix="qat-shards-")
        try:
            pafs.copy_files(path, target, source_filesystem=fs)
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
            return None
        path = target
    return path if shards_complete(path) else None


class RaySession:
    """A Ray Train worker: ``ray.train`` context, checkpoints through ``ray.train.report``.

    ``checkpoint_root``: where this run's checkpoints are persisted (storage path / run name).
    """

    def __init__(self, checkpoint_root: str) -> None:
        import ray
        import ray.train
        import ray.train.torch

        _quiet_report_lines()
        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.checkpoint_root = checkpoint_root
        self.node_id = ray.get_runtime_context().get_node_id()

    def load_state(self) -> dict[str, Any] | None:
        """The newest checkpoint state: on storage, else the one Ray hands over."""
        state = newest_state_in(self.checkpoint_root)
        if state is not None:
            return state
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            try:
                state = load_state(os.path.join(d, STATE_FILE), checkpoint.path)
            except CheckpointUnreadable:  # torn, as newest_state_in treats it: start over
                return None
            if state.get("sharded"):
                kept = tempfile.mkdtemp(prefix="qat-shards-")
                shutil.copytree(os.path.join(d, SHARDS_DIR), kept, dirs_exist_ok=True)
                if not shards_complete(kept):
                    return None
                state["_shards"] = kept
            return state

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None,
               write_shards: Callable[[Path], None] | None = None) -> None:
        """Every rank must call this (it is a barrier); only rank 0 passes ``state``; with
        ``write_shards`` every rank writes its shards into the same checkpoint (Ray Train merges
        the ranks' files into one directory)."""
        if write_shards is None and (state is None or self.rank != 0):
            self._train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            if state is not None and self.rank == 0:
                torch.save(state, os.path.join(d, STATE_FILE))
            if write_shards is not None:
                write_shards(Path(d))
            self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(d))
