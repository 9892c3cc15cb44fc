"""The FP32 baseline: trained once per (model, data, task, recipe), cached, loaded by every trial.

A cache entry is ``{"state_dict": ..., "meta": {...}}`` saved with ``torch.save`` and read with
``weights_only=True``; ``meta`` records the recipe and the baseline's test metrics. A file lock
makes concurrent callers wait for one training instead of training in parallel. How to train is
the caller's (``train/pretrain.py``): this module only caches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_write
from .cache import cache_root


@dataclass(frozen=True)
class PretrainRecipe:
    """How the FP32 baseline is trained: Adam at ``lr`` (cosine-annealed over ``epochs``) with
    ``weight_decay``, global batch ``batch_size``, a fixed ``seed``."""

    epochs: int  # the defaults live in the trial schema (ModelSpec.pretrain_*), written once
    lr: float
    batch_size: int
    weight_decay: float
    seed: int = 0


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a state_dict."""


def default_cache_dir() -> Path:
    return cache_root() / "pretrained"


def cache_key(identity: dict[str, Any], recipe: PretrainRecipe) -> str:
    """Stable hash of the model + data + task identity and the recipe."""
    blob = json.dumps({"identity": identity, "recipe": asdict(recipe)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_baseline(make_model: Callable[[], nn.Module], train: Callable[[nn.Module], dict[str, float]],
                        identity: dict[str, Any], recipe: PretrainRecipe, cache_dir: str | Path | None = None,
                        log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Path of the cached baseline for ``identity`` and its meta; on a miss the model from
    ``make_model()`` is trained by ``train(model)`` (which returns its test metrics) and saved."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = str(identity.get("model", "model")).replace("/", "_")
    path = cache / f"{name}-{cache_key(identity, recipe)}.pt"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            log(f"training the FP32 baseline of {name} ({recipe.epochs} epochs) -> {path}")
            start = time.time()
            torch.manual_seed(recipe.seed)
            model = make_model()
            metrics = train(model)
            meta = {"fp32_test": metrics, "recipe": asdict(recipe), "identity": identity,
                    "train_seconds": round(time.time() - start, 2)}
            state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            shown = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            log(f"FP32 baseline of {name}: test {shown}")
    return path, load_checkpoint(path)[1]


def load_failure(exc: BaseException) -> tuple[str | None, str]:
    """Why ``torch.load(weights_only=True)`` failed: ``(the GLOBAL it refused, or None; a one-line
    detail)``. A GLOBAL is a class or function the file asks to import and call: what a
    code-carrying (planted) pickle needs; anything else is a damaged or foreign file."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    planted = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), None)
    detail = next((line for line in lines if line.startswith(("Unsupported", "invalid load key"))),
                  (lines or [type(exc).__name__])[0])
    return (planted[:160] if planted else None), detail[:160]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a baseline file, or of a plain ``state_dict`` file (meta empty).
    Read with ``weights_only=True``: a file that would run code when unpickled is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except EOFError:
        raise CheckpointError(f"{path} is empty or truncated") from None
    except Exception as exc:  # pickle/zip errors, code-carrying pickles (UnpicklingError)
        planted, detail = load_failure(exc)
        if planted:
            raise CheckpointError(f"{path} was refused: it asks to import and call Python objects ({planted}); "
                                  "a state_dict holds tensors only") from None
        raise CheckpointError(f"{path} is not a PyTorch state_dict file ({detail})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"], dict(obj.get("meta", {}))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise CheckpointError(f"{path}: not a state_dict (a dict of tensors, or a dict with a 'state_dict' entry)")
