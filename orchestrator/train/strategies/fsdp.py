"""``fsdp``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

The simulation is built and calibrated before sharding (every rank holds rank 0's encodings then).
``wrap`` shards each block (the children of the model's largest ``ModuleList``, or the modules whose
class is named in ``trainer.fsdp_blocks``), then the root: every parameter, the quantizers' learned
encodings (``log_scale``, ``offset``: ordinary parameters of their block) included, is split on dim 0
across the ranks; each block's parameters are gathered for its forward and backward and freed after.
Buffers (fixed encodings, clip ratios, floors) are not sharded: each rank keeps its (identical) copy,
and no training step changes them. Gradients are reduce-scattered (averaged, as DDP does), so the
optimizer updates only this rank's shard. The distillation teacher is sharded the same way.

Checkpoints are sharded: every rank writes its shards with ``torch.distributed.checkpoint`` (DCP)
into the checkpoint's ``shards/`` directory and loads them back in place on resume, bit-exactly.
For export every rank takes part in gathering the full state; rank 0 loads it into an unsharded
simulation and exports that.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import fully_shard

from ...quant.build import is_quantizer_key
from ..config import TrialConfigError
from ..session import SHARDS_DIR
from .base import Strategy


def blocks_of(model: nn.Module, class_names: list[str]) -> list[nn.Module]:
    """The modules sharded as one unit each, outermost first: those whose class is named in
    ``class_names``, else the children of the largest ``ModuleList`` (by parameter count), else none."""
    if class_names:
        return [m for name, m in model.named_modules() if name and type(m).__name__ in class_names]
    lists = [m for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and not is_quantizer_key(name) and len(m) > 0]
    if not lists:
        return []
    largest = max(lists, key=lambda lst: sum(p.numel() for p in lst.parameters()))
    return [m for m in largest if any(True for _ in m.parameters())]


def shard(model: nn.Module, class_names: list[str]) -> nn.Module:
    """``fully_shard`` each block, then the root (in place); returns the root."""
    for block in blocks_of(model, class_names):
        fully_shard(block)
    fully_shard(model)
    return model


class FSDP(Strategy):
    name = "fsdp"
    lockstep = True
    sharded = True

    def wrap(self, sim, teacher):
        if self.trainer.fsdp_blocks:
            names = {type(m).__name__ for m in sim.model.modules()}
            unknown = [n for n in self.trainer.fsdp_blocks if n not in names]
            if unknown:
                raise TrialConfigError(f"trainer.fsdp_blocks={self.trainer.fsdp_blocks!r}: the model has no module of "
                                       f"class {unknown[0]!r}; its classes: {', '.join(sorted(names)[:12])}")
        shard(sim.model, self.trainer.fsdp_blocks)
        if teacher is not None:
            shard(teacher, self.trainer.fsdp_blocks)
        return sim.model, teacher

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # the sum over all shards

    def sync(self, model: nn.Module, sync: bool):
        if sync:
            return contextlib.nullcontext()
        return _no_gradient_sync(model)

    def checkpoint(self, sim, optimizer, rank):
        model = sim.model

        def write(directory: Path) -> None:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / SHARDS_DIR))

        return ({"strategy": self.name, "sharded": True} if rank == 0 else {}), write

    def restore(self, state: dict[str, Any], sim, optimizer) -> None:
        shards = state.get("_shards")
        if shards is None:
            raise TrialConfigError("trainer.strategy=fsdp: the checkpoint to resume holds a full model (written by "
                                   f"trainer.strategy={state.get('strategy', 'ddp')}), not FSDP shards; resume with "
                                   "that strategy, or pass qat.restart=true")
        model_state, optim_state = get_state_dict(sim.model, optimizer)
        loaded = {"model": model_state, "optimizer": optim_state}
        dcp.load(loaded, checkpoint_id=str(shards))
        set_state_dict(sim.model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])

    def export_sim(self, sim, rebuild, rank):
        full = get_model_state_dict(sim.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return None
        exported = rebuild()
        exported.model.load_state_dict(full)
        return exported


@contextlib.contextmanager
def _no_gradient_sync(model: nn.Module):
    """Gradients of this backward stay unreduced (accumulated locally until a synchronising one)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
