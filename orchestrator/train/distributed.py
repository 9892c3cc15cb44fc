"""Collectives the trial needs; each is a no-op (or local) when not running distributed."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return t.tolist()


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that belong to quantizers."""
    return {k: v for k, v in model.state_dict().items() if "quantizer" in k}


def full_quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``quantizer_state`` with sharded (DTensor) entries gathered whole: every rank must call it."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in quantizer_state(model).items()}


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes: equal digests mean bit-identical state."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_quantizer_state(model: nn.Module, src: int = 0) -> None:
    """Make every rank's quantizer state bit-identical to rank ``src``'s."""
    if not distributed():
        return
    payload = [quantizer_state(model) if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src)
    model.load_state_dict(payload[0], strict=False)
