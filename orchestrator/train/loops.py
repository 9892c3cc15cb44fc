"""The task-agnostic loops: one training epoch, and an evaluation whose sums are exact over ranks.

Both run on every rank of a trial (and alone for the FP32 baseline). The task (``tasks/``) says
how a batch reaches the model, the loss and the metrics; nothing here knows about labels.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..tasks import Task, to_device
from .distributed import all_gather, all_reduce_sum, distributed


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from ``teacher`` (run without gradients): the training loss is
    ``task_weight * task loss + weight * task.distill_loss(student, teacher, T=temperature)``."""

    teacher: nn.Module
    temperature: float
    weight: float
    task_weight: float


@dataclass
class EpochResult:
    """What one training epoch reports (a user's loop fills at least the first three)."""

    loss_sum: float  # task loss summed over samples
    distill_sum: float = 0.0  # distillation term summed over samples (0 without distillation)
    samples: int = 0
    seconds: float = 0.0  # the steps after the first ``warmup_steps``
    timed_samples: int = 0  # samples of those steps
    warmup_seconds: float = 0.0  # the first ``warmup_steps`` steps (torch.compile compiles there)
    diverged_step: int | None = None  # the batch index where the gradient norm was not finite
    first_step_at: float | None = None  # time.time() when the first optimizer step finished
    uniform_loss: float | None = None  # the task's loss of a uniform guess, from the first batch's logits


def local_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over all of ``grads`` (this rank's tensors: exact when they are full, as with DDP)."""
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def _no_sync(model: nn.Module, sync: bool):
    return contextlib.nullcontext()


@dataclass
class LoopContext:
    """Everything a training epoch needs besides the model, the loader and the optimizer.

    ``params``: the trainable parameters (gradient norm, clipping). ``grad_norm``: the global norm of a
    list of gradients (the strategy's: correct when they are sharded). ``sync(model, sync)``: a context
    for a backward pass that should (or, inside an accumulation, need not) synchronise gradients across
    ranks. ``on_step``: called after every optimizer step (a per-step LR schedule). ``autocast``: the
    dtype of mixed precision for the forward and loss, or None. ``kill_at_step``, ``warmup_steps``,
    ``uneven``: fault injection, the compile warmup, iterable data (see ``train_epoch``).
    """

    task: Task
    device: torch.device
    params: list[nn.Parameter]
    distill: Distillation | None = None
    clip: float | None = None
    accumulation_steps: int = 1
    autocast: torch.dtype | None = None
    grad_norm: Callable[[list[torch.Tensor]], torch.Tensor] = local_grad_norm
    sync: Callable[[nn.Module, bool], Any] = _no_sync
    on_step: Callable[[], None] | None = None
    kill_at_step: int | None = None
    warmup_steps: int = 0
    uneven: bool = False

    def autocasting(self):
        """The forward's mixed-precision context (a no-op without ``autocast``)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def losses(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor | None]:
        """One batch (already on the device) forward: ``(logits, task loss, training loss, distillation
        term or None)``; the training loss adds the distillation term when distilling."""
        task, distill = self.task, self.distill
        targets = task.targets(batch)
        with self.autocasting():
            logits = task.forward(model, batch)
            task_loss = task.loss(logits, targets)
            if distill is None:
                return logits, task_loss, task_loss, None
            with torch.no_grad():
                teacher_logits = task.forward(distill.teacher, batch)
            kd = task.distill_loss(logits, teacher_logits, targets, distill.temperature)
        return logits, task_loss, distill.task_weight * task_loss + distill.weight * kd, kd

    def step(self, optimizer: torch.optim.Optimizer, scale: float = 1.0) -> bool:
        """Divide the gradients by ``scale`` (the samples of an accumulated group, whose backward passes
        summed ``loss * samples``), clip, step, ``on_step``. False, without a step, when the global
        gradient norm is not finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if scale != 1.0:
            torch._foreach_div_(grads, scale)
        norm = self.grad_norm(grads)
        if not bool(torch.isfinite(norm)):
            return False
        if self.clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, norm, foreach=True)
        optimizer.step()
        if self.on_step is not None:
            self.on_step()
        return True


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                ctx: LoopContext) -> EpochResult:
    """The default training epoch (``qat.loop``): one pass over ``loader``, an optimizer step every
    ``ctx.accumulation_steps`` batches (and after the last); stops at the first step with a
    non-finite gradient norm (with even shards every rank sees the same all-reduced gradients and
    stops at the same step; the caller decides on all-reduced results either way).

    With accumulation each batch's backward pass sums ``loss * samples`` and the step divides by
    the group's samples: the gradient of the group's sample-weighted mean loss, as one large batch.
    ``ctx.uneven``: ranks may run out of batches at different steps (iterable data); DDP's ``join``
    lets the ranks still training go on alone. The first ``ctx.warmup_steps`` steps are timed apart.
    """
    device, task, accumulate = ctx.device, ctx.task, ctx.accumulation_steps
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    distill_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = timed_from = group_samples = 0
    first_step_at = uniform = None
    start = warm_end = time.perf_counter()
    joining = model.join() if ctx.uneven and distributed() and hasattr(model, "join") else contextlib.nullcontext()
    last = len(loader) - 1 if hasattr(loader, "__len__") and not ctx.uneven else None

    def result(diverged: int | None) -> EpochResult:
        return EpochResult(float(loss_sum), float(distill_sum), samples, time.perf_counter() - warm_end,
                           samples - timed_from, warm_end - start, diverged, first_step_at, uniform)

    with joining:
        for step, batch in enumerate(loader):
            if step == ctx.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a real, abrupt worker death
            batch = to_device(batch, device)
            n = task.samples(batch)
            if group_samples == 0:
                optimizer.zero_grad(set_to_none=True)
            ends_group = accumulate == 1 or (step + 1) % accumulate == 0 or step == last
            with ctx.sync(model, ends_group):
                logits, task_loss, loss, kd = ctx.losses(model, batch)
                (loss if accumulate == 1 else loss * n).backward()
            group_samples += n
            if kd is not None:
                distill_sum += kd.detach().double() * n
            if uniform is None:
                uniform = task.uniform_loss(logits.detach().float())
            loss_sum += task_loss.detach().double() * n
            samples += n
            if not ends_group:
                continue
            if not ctx.step(optimizer, 1.0 if accumulate == 1 else float(group_samples)):
                loss_sum -= task_loss.detach().double() * n  # the diverged step's loss is not counted
                samples -= n
                return result(step)
            group_samples = 0
            if first_step_at is None:
                first_step_at = time.time()
            if step + 1 == ctx.warmup_steps:
                warm_end, timed_from = time.perf_counter(), samples
        if group_samples and accumulate > 1:  # an uneven (iterable) epoch ended inside a group
            if not ctx.step(optimizer, float(group_samples)):
                return result(step)
    return result(None)


def run_loop(spec: str | dict[str, Any], model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
             ctx: LoopContext) -> EpochResult:
    """``qat.loop``: ``fn(model, loader, optimizer, ctx, **other keys)``, ``fn`` its dotted path or ``_target_``."""
    from .optim import split_partial

    if isinstance(spec, str):
        spec = {"_target_": spec}
    fn, kwargs = split_partial(spec, "qat.loop")
    result = fn(model, loader, optimizer, ctx, **kwargs)
    if not isinstance(result, EpochResult):
        from .config import TrialConfigError

        raise TrialConfigError(f"qat.loop._target_={spec['_target_']!r} returned {type(result).__name__}; "
                               "an epoch function returns orchestrator.train.loops.EpochResult")
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device, *,
             lockstep: bool = False, filler: Any = None) -> dict[str, float]:
    """The task's metrics over every sample of ``loader``'s dataset: this rank sums its shard,
    the sums are all-reduced, the task turns them into metrics (``{"acc": 94.8, ...}``).

    ``lockstep``: every rank runs as many forwards as the rank with the most batches (a sharded
    model's forward is a collective); a rank out of batches runs ``filler`` (a batch on the device,
    or its own first batch) and counts nothing of it."""
    was_training = model.training
    model.eval()
    sums: dict[str, Any] = {}

    def add(batch: Any) -> None:
        for key, value in task.metric_sums(task.forward(model, batch), task.targets(batch)).items():
            sums[key] = sums.get(key, 0.0) + value

    if not (lockstep and distributed()):
        for batch in loader:
            add(to_device(batch, device))
    else:
        batches = iter(loader)
        while True:
            batch = next(batches, None)
            if not all_reduce_sum([float(batch is not None)], device)[0]:
                break
            if batch is None:
                task.forward(model, filler)
                continue
            batch = to_device(batch, device)
            filler = batch if filler is None else filler
            add(batch)
    model.train(was_training)
    # every rank all-reduces the same keys, even one whose shard was empty
    keys = sorted(set().union(*all_gather(sorted(sums)))) if distributed() else sorted(sums)
    totals = all_reduce_sum([float(sums.get(k, 0.0)) for k in keys], device)
    return task.compute_metrics(dict(zip(keys, totals)))
