"""``ddp``: DistributedDataParallel, a full replica of ``sim.model`` per worker, gradients
all-reduced (averaged) in buckets during the backward pass. The teacher runs unwrapped (no
gradients). Every rank holds the same full state: rank 0's is the checkpoint."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy


class DDP(Strategy):
    name = "ddp"

    def wrap(self, sim, teacher):
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(sim.model, device_ids=ids), teacher

    def sync(self, model: nn.Module, sync: bool):
        return contextlib.nullcontext() if sync else model.no_sync()
