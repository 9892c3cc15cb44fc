"""The task-agnostic loops: one training epoch, and an evaluation whose sums are exact over ranks.

Both run on every rank of a trial (and alone for the FP32 baseline). The task (``tasks/``) says
how a batch reaches the model, the loss and the metrics; nothing here knows about labels.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
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
    loss_sum: float  # task loss summed over samples
    distill_sum: float  # distillation term summed over samples (0 without distillation)
    samples: int
    seconds: float  # the steps after the first ``warmup_steps``
    timed_samples: int  # samples of those steps
    warmup_seconds: float  # the first ``warmup_steps`` steps (torch.compile compiles there)
    diverged_step: int | None
    first_step_at: float | None  # time.time() when the first optimizer step finished
    uniform_loss: float | None  # the task's loss of a uniform guess, from the first batch's logits


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                task: Task, device: torch.device, *, clip: float | None = None, distill: Distillation | None = None,
                kill_at_step: int | None = None, warmup_steps: int = 0, uneven: bool = False) -> EpochResult:
    """One pass over ``loader``; stops at the first step with a non-finite gradient norm (with
    even shards every rank sees the same all-reduced gradients and stops at the same step; the
    caller decides on all-reduced results either way).

    ``uneven``: ranks may run out of batches at different steps (iterable data); DDP's ``join``
    lets the ranks still training go on alone. The first ``warmup_steps`` steps are timed apart.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    distill_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = timed_from = 0
    first_step_at = uniform = None
    start = warm_end = time.perf_counter()
    joining = model.join() if uneven and distributed() and hasattr(model, "join") else contextlib.nullcontext()
    with joining:
        for step, batch in enumerate(loader):
            if step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a real, abrupt worker death
            batch = to_device(batch, device)
            targets = task.targets(batch)
            n = task.samples(batch)
            optimizer.zero_grad(set_to_none=True)
            logits = task.forward(model, batch)
            task_loss = task.loss(logits, targets)
            loss = task_loss
            if distill is not None:
                with torch.no_grad():
                    teacher_logits = task.forward(distill.teacher, batch)
                kd = task.distill_loss(logits, teacher_logits, targets, distill.temperature)
                loss = distill.task_weight * task_loss + distill.weight * kd
                distill_sum += kd.detach().double() * n
            loss.backward()
            if uniform is None:
                uniform = task.uniform_loss(logits.detach())
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if not bool(torch.isfinite(norm)):
                return EpochResult(float(loss_sum), float(distill_sum), samples, time.perf_counter() - warm_end,
                                   samples - timed_from, warm_end - start, step, first_step_at, uniform)
            if clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm, foreach=True)
            optimizer.step()
            if first_step_at is None:
                first_step_at = time.time()
            loss_sum += task_loss.detach().double() * n
            samples += n
            if step + 1 == warmup_steps:
                warm_end, timed_from = time.perf_counter(), samples
    return EpochResult(float(loss_sum), float(distill_sum), samples, time.perf_counter() - warm_end,
                       samples - timed_from, warm_end - start, None, first_step_at, uniform)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device) -> dict[str, float]:
    """The task's metrics over every sample of ``loader``'s dataset: this rank sums its shard,
    the sums are all-reduced, the task turns them into metrics (``{"acc": 94.8, ...}``)."""
    was_training = model.training
    model.eval()
    sums: dict[str, Any] = {}
    for batch in loader:
        batch = to_device(batch, device)
        for key, value in task.metric_sums(task.forward(model, batch), task.targets(batch)).items():
            sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    # every rank all-reduces the same keys, even one whose shard was empty
    keys = sorted(set().union(*all_gather(sorted(sums)))) if distributed() else sorted(sums)
    totals = all_reduce_sum([float(sums.get(k, 0.0)) for k in keys], device)
    return task.compute_metrics(dict(zip(keys, totals)))
