"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and _disk_full(exc, path.parent):
            raise OSError(errno.ENOSPC, f"No space left on device: cannot write {path} "
                                        f"({shutil.disk_usage(path.parent).free} bytes free there)") from exc
        raise


def _disk_full(exc: Exception, where: Path) -> bool:
    """The write failed for want of space: an ``OSError`` saying so, or an I/O error in a writer's
    own words (``torch.save``'s zip writer raises ``RuntimeError``) on a file system that is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(where).free < 1024 * 1024
    except OSError:
        return False


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable_dir(path: str | Path, key: str) -> None:
    """Raise ``ValueError`` (one line naming ``key``) unless ``path`` is, or can be created as, a
    writable directory. Probed for real (permission bits say nothing to root, nor about read-only
    mounts or a full disk): what the probe creates is removed again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{key}={str(path)!r} is a file, not a directory")
    created: list[Path] = []
    try:
        missing = [p for p in [path, *path.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".qat-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{key}={str(path)!r} is not writable ({exc.strerror or exc}); choose another "
                         "directory") from None
    finally:
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
