"""One driver per sweep name at a time.

``<paths.root>/sweeps/.<name>.lock`` is held with ``flock`` for the driver's whole life and names
it (host, pid, start time). A second driver of the same name is refused at once with one line
naming the running one. The kernel releases the lock when its holder dies, however it dies, so
a lock left by a killed driver is taken over (and said so); no stale file can block a resume.

The sweep's MLflow parent run names its driver too (tag ``qat.driver``): a driver on another host
whose parent run is still RUNNING (a shared tracking server; an output root whose file system
does not share locks) is refused as well.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..train.config import TrialConfigError


class SweepLocked(TrialConfigError):
    """Another driver runs a sweep of this name."""


DRIVER_TAG = "qat.driver"


def driver_record() -> str:
    """This driver as JSON: host, pid, start time (UTC)."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": _STARTED})


_STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def lock_path(root: Path, name: str) -> Path:
    return Path(root) / "sweeps" / f".{name}.lock"


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a driver that left no details"


class SweepLock:
    """``acquire()`` or ``SweepLocked``; ``release()`` (also on garbage collection of the process)."""

    def __init__(self, root: Path, name: str) -> None:
        self.path = lock_path(root, name)
        self.name = name
        self.fd: int | None = None
        self.took_over: str | None = None  # the dead holder whose lock was taken over, if any
        self.created: list[Path] = []

    def acquire(self) -> SweepLock:
        # the directories created here go again on release if nothing else was written in them
        self.created = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise SweepLocked(f"sweep.name={self.name!r} is running already: {_holder_text(holder)} "
                                  f"(lock {self.path}); wait for it to end, or choose another sweep.name") from None
            try:  # the file locked is still the one at the path (its last holder may have removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = os.read(fd, 4096).decode(errors="replace").strip()
            self.took_over = _holder_text(previous) if previous else None
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, driver_record().encode())
            os.fsync(fd)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: a waiting driver then re-opens a new file
        os.close(self.fd)
        self.fd = None
        for d in self.created:
            try:
                d.rmdir()
            except OSError:  # not empty: the sweep wrote there
                break


def check_tracked_driver(uri: str, experiment: str, sweep_id: str, name: str) -> None:
    """Refuse (``SweepLocked``) when the sweep's parent run is RUNNING under a driver on another
    host. (On this host the lock file decides: its holder is alive, or the lock is free.)"""
    from ..tracking.mlflow_runs import SWEEP_ID_TAG, client, find_run, is_sqlite, sqlite_path, retrying

    if is_sqlite(uri) and not sqlite_path(uri).exists():
        return  # no store yet: no sweep of this name was ever tracked there
    exp = retrying(lambda: client(uri).get_experiment_by_name(experiment))
    run = find_run(uri, exp.experiment_id, SWEEP_ID_TAG, sweep_id) if exp is not None else None
    if run is None or run.info.status != "RUNNING":
        return
    raw = run.data.tags.get(DRIVER_TAG, "")
    try:
        host = json.loads(raw)["host"]
    except (ValueError, KeyError, TypeError):
        return  # recorded before drivers were named
    if host != socket.gethostname():
        raise SweepLocked(f"sweep.name={name!r} is running already on another host: {_holder_text(raw)} "
                          f"(MLflow run {run.info.run_id} is RUNNING); wait for it to end, choose another sweep.name, "
                          f"or if that driver is gone end its run (MlflowClient().set_terminated("
                          f"'{run.info.run_id}', 'KILLED')) and resume")
