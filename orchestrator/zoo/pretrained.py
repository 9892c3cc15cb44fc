"""The FP32 baseline: trained once per (model, data, recipe), cached, loaded by every trial.

A cache entry is ``{"state_dict": ..., "meta": {...}}`` saved with ``torch.save`` and readable
with ``weights_only=True``; ``meta`` records the recipe and the baseline's test accuracy. A
file lock makes concurrent callers wait for one training instead of training in parallel.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..fileio import atomic_write
from .datasets import DataSplits


@dataclass(frozen=True)
class PretrainRecipe:
    """How the FP32 baseline is trained: Adam, cross-entropy, a fixed seed."""

    epochs: int = 15
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("QAT_CACHE_DIR", Path.home() / ".cache" / "qat-orchestrator")) / "pretrained"


def cache_key(identity: dict[str, Any], recipe: PretrainRecipe) -> str:
    """Stable hash of the model + data identity and the recipe."""
    blob = json.dumps({"identity": identity, "recipe": asdict(recipe)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def test_accuracy(model: nn.Module, data: DataSplits, batch_size: int = 512) -> float:
    """Top-1 accuracy on ``data.test`` in percent (eval mode)."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data.test, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def train_baseline(model: nn.Module, data: DataSplits, recipe: PretrainRecipe) -> None:
    """Train ``model`` in place with ``recipe`` on ``data.train``."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(data.train, batch_size=recipe.batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    model.train()
    for _ in range(recipe.epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


def pretrained_baseline(make_model: Callable[[], nn.Module], data: DataSplits, identity: dict[str, Any],
                        recipe: PretrainRecipe, cache_dir: str | Path | None = None,
                        log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Path of the cached baseline for ``identity`` (training it first if needed) and its meta."""
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
            train_baseline(model, data, recipe)
            meta = {"fp32_test_acc": test_accuracy(model, data), "recipe": asdict(recipe), "identity": identity,
                    "train_seconds": round(time.time() - start, 2)}
            state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            log(f"FP32 baseline of {name}: test accuracy {meta['fp32_test_acc']:.2f}%")
    return path, load_checkpoint(path)[1]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a baseline file, or of a plain ``state_dict`` file (meta empty)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"], dict(obj.get("meta", {}))
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"{path}: not a state_dict (nor a dict with a 'state_dict' entry)")
