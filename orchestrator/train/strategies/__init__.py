"""How a trial's workers share the model (``trainer.strategy``): a registry, name -> class, each
imported only when chosen.

- ``single``: one worker trains ``sim.model`` as it is (``single.py``);
- ``ddp``: DistributedDataParallel, a full replica per worker, gradients all-reduced (``ddp.py``);
- ``fsdp``: PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded across
  the workers, gathered per block for its forward and backward (``fsdp.py``).

Each owns the wrapping, the global gradient norm, the checkpoint of model and optimizer, and the full
model on rank 0 for export (``base.Strategy``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..config import TrainerSpec
    from .base import Strategy

STRATEGIES = {"single": "single:Single", "ddp": "ddp:DDP", "fsdp": "fsdp:FSDP"}


def make_strategy(trainer: TrainerSpec, device: torch.device) -> Strategy:
    """The strategy ``trainer.strategy`` names (or the default for ``trainer.num_workers``)."""
    module, _, cls = STRATEGIES[trainer.strategy_name].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(trainer, device)
