"""A run is its config: the fingerprint of what decides a trial's result, and the check that a
resumed or rerun trial is the same trial.

The *decisive* config is the trial's ``model``, ``data``, ``task``, ``quant`` and ``qat`` sections
and its world size (the per-rank batch and the data shards depend on it), with a user's
``model.checkpoint`` replaced by the SHA-256 of the file's bytes (a built-in baseline is decided
by its recipe, which is in ``model``). Paths, tracking, logging, loader workers, compilation,
``qat.restart`` and the export check's settings (``qat.qdq_*``) are not decisive. The fingerprint
is the SHA-256 of that flat mapping.

It is recorded three times: ``<output_dir>/identity.json`` (written once the trial is accepted,
before anything trains), in every checkpoint (``state["identity"]``), and as the MLflow run's
``qat.fingerprint`` tag. A trial whose output directory holds another fingerprint is refused
before anything runs, naming the keys that differ and the two ways on: another ``name`` (a new
run), or ``qat.restart=true``, which moves the old outputs aside (``<dir>.archived-<UTC time>``)
and starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json
from .config import TrialConfig, TrialConfigError

IDENTITY_FILE = "identity.json"
FINGERPRINT_TAG = "qat.fingerprint"  # the MLflow run's record of it
DECISIVE_SECTIONS = ("model", "data", "task", "quant", "qat")
NOT_DECISIVE = frozenset({"model.cache_dir", "data.loader_workers", "qat.restart", "qat.qdq_check_batches",
                          "qat.qdq_min_sqnr_db"})
EARLIER_RUN_ENTRIES = ("checkpoints", "export", "ray")  # what an earlier trial leaves in its output directory
_DIGESTS: dict[tuple[str, int, int], str] = {}


class RunMismatch(TrialConfigError):
    """A resume or rerun whose config is not the one the run was made with."""


@dataclass
class RunIdentity:
    """``fingerprint``: 16 hex digits; ``config``: the decisive keys, flat (``quant.param_bw``);
    ``point``: the sweep point of a sweep trial (how to compose its config again), else None."""

    fingerprint: str
    config: dict[str, Any]
    point: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def matches(self, other: RunIdentity) -> bool:
        """The same run: the same fingerprint, or no decisive key that differs (a key one side
        lacks counts as its schema default: a config key added since the run started, at its
        default, changes nothing)."""
        return self.fingerprint == other.fingerprint or not differing_keys(self.config, other.config)

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "config": self.config, "point": self.point, "created": self.created}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunIdentity:
        return cls(str(d["fingerprint"]), dict(d.get("config") or {}), d.get("point"), str(d.get("created", "")))


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes (cached per path, size and modification time)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = f"sha256:{h.hexdigest()}"
    return _DIGESTS[key]


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k in sorted(value):
            _flat(f"{prefix}.{k}", value[k], out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def decisive_config(cfg: TrialConfig) -> dict[str, Any]:
    """The flat decisive mapping of ``cfg`` (see the module docstring)."""
    full = cfg.to_dict()
    out: dict[str, Any] = {}
    for section in DECISIVE_SECTIONS:
        _flat(section, full[section], out)
    for key in NOT_DECISIVE:
        out.pop(key, None)
    checkpoint = cfg.model.checkpoint
    if checkpoint:
        path = Path(checkpoint).expanduser()
        out["model.checkpoint"] = file_digest(path) if path.is_file() else str(checkpoint)
    out["trainer.world_size"] = max(1, cfg.trainer.num_workers)
    return out


def run_identity(cfg: TrialConfig, point: dict[str, Any] | None = None) -> RunIdentity:
    config = decisive_config(cfg)
    text = json.dumps(config, sort_keys=True, default=str)
    return RunIdentity(hashlib.sha256(text.encode()).hexdigest()[:16], config, point)


_UNSET = "<unset>"


def _schema_defaults() -> dict[str, Any]:
    return decisive_config(TrialConfig())


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The decisive keys whose values differ; a key one side lacks stands for its schema default."""
    defaults = _schema_defaults()
    return sorted(k for k in set(old) | set(new)
                  if _plain(old.get(k, defaults.get(k, _UNSET))) != _plain(new.get(k, defaults.get(k, _UNSET))))


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``"quant.param_bw: 8 -> 4, qat.lr: 0.001 -> 0.5"`` (the first ``limit``, then a count)."""
    keys = differing_keys(old, new)
    shown = [f"{k}: {_text(old.get(k, _UNSET))} -> {_text(new.get(k, _UNSET))}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more if shown else "the same keys, other values"


def _text(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def read_identity(output_dir: str | Path) -> RunIdentity | None:
    path = Path(output_dir) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        return RunIdentity.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def has_earlier_run(output_dir: str | Path) -> bool:
    d = Path(output_dir)
    return any((d / entry).exists() for entry in EARLIER_RUN_ENTRIES)


def mismatch_message(what: str, stored: RunIdentity | None, current: RunIdentity, rename: str = "name") -> str:
    """One line: what differs and the two ways on (``rename``: the key that names a new run)."""
    if stored is None:
        why = "has no run fingerprint (written by an older version), so it cannot be resumed safely"
    else:
        why = f"was made with another config ({differences(stored.config, current.config)})"
    return (f"{what} {why}; start a new run with another {rename}=..., or pass qat.restart=true to archive its "
            "outputs and start over")


def check_output_dir(output_dir: str | Path, current: RunIdentity, what: str, rename: str = "name") -> None:
    """Refuse (``RunMismatch``) when ``output_dir`` holds an earlier run of another config."""
    stored = read_identity(output_dir)
    if stored is None and not has_earlier_run(output_dir):
        return  # a new run
    if stored is not None and stored.matches(current):
        return  # the same run: resume it, or report it again if it ended
    raise RunMismatch(mismatch_message(what, stored, current, rename))


def check_state(state: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """A checkpoint's recorded identity matches the trial's (``current``: ``RunIdentity.to_dict()``):
    the worker's own check before it loads one (a shared storage path may hold another run's)."""
    if not current:
        return
    mine = RunIdentity.from_dict(current)
    recorded = state.get("identity") or {}
    if not recorded.get("fingerprint") or not mine.matches(RunIdentity.from_dict(recorded)):
        raise RunMismatch(f"checkpoint {where} belongs to another run (fingerprint {recorded.get('fingerprint') or 'none'}, "
                          f"this trial {mine.fingerprint}); choose another name, or pass qat.restart=true to start over")


def archive(paths: list[str | Path]) -> list[str]:
    """Move each existing path to ``<path>.archived-<UTC time>``; returns the new locations."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for p in paths:
        p = Path(p)
        if p.exists():
            target = p.with_name(f"{p.name}.archived-{stamp}")
            shutil.move(str(p), str(target))
            moved.append(str(target))
    return moved


def write_identity(output_dir: str | Path, identity: RunIdentity) -> None:
    atomic_write_json(Path(output_dir) / IDENTITY_FILE, identity.to_dict())
