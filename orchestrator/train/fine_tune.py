"""Step 3 of a trial: fine-tuning ``sim.model`` on one rank, one epoch at a time.

``Training.start`` wraps the calibrated simulation with the trial's strategy (``strategies/``),
optionally compiles it, builds the optimizer and schedule (``optim.py``) and the training loader,
and restores a checkpoint's model, optimizer and schedule. ``Training.epoch`` runs the configured
loop (``qat.loop``, ``loops.train_epoch`` by default) and all-reduces what it reports: every
decision (divergence) is taken on values all ranks share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..quant import QuantizationSimModel
from ..tasks import Task
from .config import AUTOCAST_DTYPES, TrialConfig, TrialConfigError
from .data import FirstBatches, is_iterable, set_epoch, train_loader
from .distributed import all_reduce_sum
from .divergence import EXPLODED_LOSS_FACTOR, exploded_loss
from .loops import Distillation, EpochResult, LoopContext, run_loop
from .optim import Schedule, make_optimizer, make_schedule
from .strategies.base import Strategy


@dataclass
class EpochTotals:
    """One epoch's results summed over ranks (``train_seconds``: the mean over ranks)."""

    mean_loss: float
    mean_distill: float
    diverged_ranks: float
    uniform_loss: float | None
    train_seconds: float
    timed_samples: float
    result: EpochResult  # this rank's own


@dataclass
class Training:
    cfg: TrialConfig
    strategy: Strategy
    model: nn.Module  # what trains: sim.model wrapped (and compiled)
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    loader: DataLoader | FirstBatches
    sampler: Sampler | None
    params: list[nn.Parameter]

    @classmethod
    def start(cls, cfg: TrialConfig, sim: QuantizationSimModel, teacher: nn.Module | None, train_set,
              collate_fn, strategy: Strategy, rank: int, world: int, state: dict[str, Any] | None) -> Training:
        qat = cfg.qat
        if strategy.lockstep and is_iterable(train_set):
            raise TrialConfigError(f"trainer.strategy={strategy.name} needs a map-style training set (every rank runs "
                                   "the same number of steps); an iterable one trains with trainer.strategy=ddp")
        model, teacher = strategy.wrap(sim, teacher)
        if cfg.trainer.compile:
            model = torch.compile(model)
        optimizer = make_optimizer(qat, [p for p in sim.model_parameters() if p.requires_grad],  # qat.lora freezes
                                   sim.encoding_param_group(qat.encoding_lr))
        if sim.quantizer_parameters():
            sim.watch_encodings(optimizer)  # a learned scale at its floor is warned about by name
        loader, sampler = train_loader(train_set, max(1, qat.batch_size // world), rank, world, qat.seed,
                                       strategy.device, collate_fn, cfg.data.loader_workers)
        if qat.batches_per_epoch is not None:
            loader = FirstBatches(loader, qat.batches_per_epoch)
        steps = None if is_iterable(train_set) else -(-len(loader) // qat.accumulation_steps)
        schedule = make_schedule(qat, optimizer, steps)
        if state is not None:
            strategy.restore(state, sim, optimizer)
            schedule.scheduler.load_state_dict(state["scheduler"])
        params = [p for p in sim.model.parameters() if p.requires_grad]
        return cls(cfg, strategy, model, teacher, optimizer, schedule, loader, sampler, params)

    def context(self, task: Task, distill: Distillation | None, kill_at: int | None, warmup: int,
                uneven: bool) -> LoopContext:
        qat = self.cfg.qat
        per_step = self.schedule.scheduler.step if self.schedule.interval == "step" else None
        if distill is not None and self.teacher is not distill.teacher:
            distill = Distillation(self.teacher, distill.temperature, distill.weight, distill.task_weight)
        return LoopContext(task, self.strategy.device, self.params, distill=distill, clip=qat.grad_clip_norm,
                           accumulation_steps=qat.accumulation_steps,
                           autocast=getattr(torch, AUTOCAST_DTYPES[qat.autocast]) if qat.autocast else None,
                           grad_norm=self.strategy.grad_norm, sync=self.strategy.sync, on_step=per_step,
                           kill_at_step=kill_at, warmup_steps=warmup, uneven=uneven)

    def epoch(self, epoch: int, train_set, ctx: LoopContext, world: int) -> EpochTotals:
        """One epoch of ``qat.loop`` and its all-reduced totals (the schedule is not stepped here)."""
        set_epoch(train_set, self.sampler, epoch)
        result = run_loop(self.cfg.qat.loop, self.model, self.loader, self.optimizer, ctx)
        # every decision on all-reduced values: with uneven (iterable) data the ranks run different
        # numbers of steps, and one may diverge at a step the others never take
        (loss_sum, distill_sum, samples, diverged_ranks, uniform_sum, uniform_ranks, train_seconds,
         timed_samples) = all_reduce_sum(
            [result.loss_sum, result.distill_sum, result.samples, float(result.diverged_step is not None),
             result.uniform_loss or 0.0, float(result.uniform_loss is not None), result.seconds,
             result.timed_samples], ctx.device)
        return EpochTotals(loss_sum / max(samples, 1), distill_sum / max(samples, 1), diverged_ranks,
                           uniform_sum / uniform_ranks if uniform_ranks else None,
                           max(train_seconds / world, 1e-9), timed_samples, result)

    def end_epoch(self) -> None:
        if self.schedule.interval == "epoch":
            self.schedule.scheduler.step()


def divergence(cfg: TrialConfig, epoch: int, totals: EpochTotals) -> str | None:
    """Why the epoch diverged (one line), or None."""
    qat = cfg.qat
    if totals.diverged_ranks:
        step = totals.result.diverged_step
        where = f", step {step}" if step is not None else ""
        return (f"training diverged: non-finite loss/gradients at epoch {epoch}{where} (qat.lr={qat.lr}, "
                f"qat.optimizer={qat.optimizer}); lower qat.lr or set qat.grad_clip_norm")
    if exploded_loss(totals.mean_loss, totals.uniform_loss):
        return (f"training diverged: mean training loss {totals.mean_loss:.3g} at epoch {epoch} is more than "
                f"{EXPLODED_LOSS_FACTOR:g}x that of a uniform guess (qat.lr={qat.lr}, qat.optimizer={qat.optimizer}); "
                "lower qat.lr or set qat.grad_clip_norm")
    return None


def epoch_timing(totals: EpochTotals, epoch_start: float) -> dict[str, float]:
    return {"epoch_time_s": time.perf_counter() - epoch_start,
            "samples_per_s": totals.timed_samples / totals.train_seconds}
