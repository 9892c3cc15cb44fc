"""Batches of any form: a tensor, a tuple/list, or a dict (Hugging Face style), nested.

``to_device`` moves every tensor of a batch as it is (non-blocking from pinned memory);
``batch_size`` counts its samples; ``head`` keeps its first ``n`` samples (the export's dummy
input); ``feed`` calls a model the way the batch says; ``logits_of`` reads a model's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (the same nesting, the same container types)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the leading dimension of its first tensor."""
    t = first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 1


def head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of every tensor in ``batch``."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: head(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(head(v, n) for v in batch)
    return batch


def feed(model: nn.Module, inputs: Any) -> Any:
    """``model`` called with ``inputs``: a dict as keyword arguments, a tuple/list as positional
    arguments, anything else as the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a ``ModelOutput`` (``.logits``), or a tuple (first)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "return a tensor, a tuple whose first element is the logits, or an object with .logits")
