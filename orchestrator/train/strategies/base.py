"""The interface every strategy implements, and what they share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...quant import QuantizationSimModel
from ..config import TrainerSpec, TrialConfigError
from ..loops import local_grad_norm

ShardWriter = Callable[[Path], None]  # writes this rank's shards of a checkpoint into a directory


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of ``t`` (its local shard when ``t`` is a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class Strategy:
    """Wrapping, gradient norm, checkpoints and the exported model for one way of sharing the model.

    ``lockstep``: every rank must run every forward of the model (evaluation included), as FSDP's
    gathers are collectives. ``sharded``: checkpoints are written by every rank (``ShardWriter``).
    """

    name = ""
    lockstep = False
    sharded = False

    def __init__(self, trainer: TrainerSpec, device: torch.device) -> None:
        self.trainer, self.device = trainer, device

    def wrap(self, sim: QuantizationSimModel, teacher: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
        """``(the model to train, the teacher to run)``; ``sim.model`` is calibrated already."""
        return sim.model, teacher

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The 2-norm over every rank's gradients (a plain tensor, equal on every rank)."""
        return local_grad_norm(grads)

    def sync(self, model: nn.Module, sync: bool):
        """Context for a backward pass that synchronises gradients (``sync``) or, inside an
        accumulation, may leave them local."""
        return contextlib.nullcontext()

    def checkpoint(self, sim: QuantizationSimModel, optimizer: torch.optim.Optimizer,
                   rank: int) -> tuple[dict[str, Any], ShardWriter | None]:
        """The model and optimizer part of a checkpoint: entries of rank 0's state, and a writer
        every rank runs (sharded strategies) or None."""
        if rank != 0:
            return {}, None
        return {"model": sim.model.state_dict(), "optimizer": optimizer.state_dict(), "strategy": self.name}, None

    def restore(self, state: dict[str, Any], sim: QuantizationSimModel, optimizer: torch.optim.Optimizer) -> None:
        """Load a checkpoint's model and optimizer (after ``wrap``, into the wrapped model)."""
        if "model" not in state:
            raise TrialConfigError(f"trainer.strategy={self.name}: the checkpoint to resume holds sharded state "
                                   f"(written by trainer.strategy={state.get('strategy', 'fsdp')}); resume with that "
                                   "strategy, or pass qat.restart=true")
        sim.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def export_sim(self, sim: QuantizationSimModel, rebuild: Callable[[], QuantizationSimModel],
                   rank: int) -> QuantizationSimModel | None:
        """The simulation rank 0 exports (None on other ranks): ``sim`` itself when it holds the
        full model; else every rank takes part in gathering it and rank 0 loads it into ``rebuild()``."""
        return sim if rank == 0 else None

    def memory_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of parameters and optimizer state held by this rank."""
        params = sum(local_bytes(p) for p in model.parameters())
        state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
        return params + state
