"""Task: what is being learned. The train loop, checkpoints, tracking and sweeps know nothing else.

A task says how a batch reaches the model (``inputs``) and what it is scored against
(``targets``), the training loss, and its metrics. Metrics are computed from additive sums
(``metric_sums``: e.g. correct predictions and samples), so that evaluation sharded over
ranks is exact: every rank sums its shard, the sums are all-reduced, ``metrics`` divides.

A user task subclasses ``Task`` (or implements the same methods) and is named by
``task._target_`` in the trial config; its constructor receives ``task.args``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import batch_size, feed, logits_of


@dataclass(frozen=True)
class Metric:
    """One metric of a task. ``mode``: ``max`` (higher is better) or ``min``.
    ``percent_of_samples``: the value is a percentage of samples (accuracy), so one sample is
    worth ``100 / n`` of it: comparisons treat smaller differences as ties."""

    name: str
    mode: str
    percent_of_samples: bool = False


class Task(ABC):
    """Loss, metrics and batch layout of a learning task.

    ``metrics``: every metric the task reports (logged as ``{stage}_{name}``: ``fp32_acc``,
    ``ptq_acc``, ``val_acc``, ``test_acc``); ``primary``: the name of the one sweeps select on
    by default (as ``val_<primary>``) and tables lead with.
    """

    metrics: tuple[Metric, ...] = ()
    primary: str = ""
    ignored: tuple[int, ...] = ()  # target values that mark positions not scored (padding)

    # -- batch layout ------------------------------------------------------------------------
    @abstractmethod
    def inputs(self, batch: Any) -> Any:
        """What the model is called with: a tensor, a tuple of arguments or a dict of keywords."""

    @abstractmethod
    def targets(self, batch: Any) -> Any:
        """What the model's output is scored against."""

    def samples(self, batch: Any) -> int:
        """Samples in ``batch`` (what ``samples_per_s`` and the mean training loss count)."""
        return batch_size(batch)

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's logits for ``batch``."""
        return logits_of(feed(model, self.inputs(batch)))

    def invalid_target(self, targets: Any, num_outputs: int) -> tuple[int, Any] | None:
        """``(sample index in the batch, value)`` of the first target that names no output class
        (an integer outside ``[0, num_outputs)`` and not ``ignored``), or None when all fit.
        Targets that are not integer tensors (soft labels, a user's structures) are not checked."""
        if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
            return None
        bad = (targets < 0) | (targets >= num_outputs)
        for value in self.ignored:
            bad &= targets != value
        if not bool(bad.any()):
            return None
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        row = flat // max(1, targets[0].numel()) if targets.dim() > 1 else flat
        return row, int(targets.reshape(-1)[flat])

    # -- learning ----------------------------------------------------------------------------
    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: Any) -> torch.Tensor:
        """The training loss (a scalar, mean over the batch)."""

    @abstractmethod
    def metric_sums(self, logits: torch.Tensor, targets: Any) -> dict[str, float]:
        """Additive statistics of one batch (summed over batches and ranks)."""

    @abstractmethod
    def compute_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``{metric name: value}`` from the summed statistics of a whole split."""

    def uniform_loss(self, logits: torch.Tensor) -> float | None:
        """The loss of a uniform guess over the output classes (``ln C``), or None when the task has
        no such reference. Training whose mean loss runs far above it has diverged."""
        return math.log(logits.shape[-1]) if logits.dim() >= 1 and logits.shape[-1] > 1 else None

    def chance(self, num_outputs: int) -> dict[str, float]:
        """Metric values reached by guessing at random among ``num_outputs`` classes (the logits'
        last dimension); empty when the task has no such notion."""
        return {}

    # -- knowledge distillation --------------------------------------------------------------
    def prediction_rows(self, logits: torch.Tensor, targets: Any) -> torch.Tensor:
        """The logits the loss scores, one row per prediction ``[P, C]`` (classification: the
        batch; language modelling: every scored token)."""
        return logits.reshape(-1, logits.shape[-1])

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, targets: Any,
                     temperature: float) -> torch.Tensor:
        """Hinton et al.'s distillation term: ``T^2 * KL(p_teacher^T || p_student^T)``, the mean over
        predictions, with ``p^T = softmax(logits / T)``. Its gradient matches the task loss's scale at
        any ``T`` (hence ``T^2``)."""
        s = self.prediction_rows(student, targets).float() / temperature
        t = self.prediction_rows(teacher, targets).float() / temperature
        kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
        return kl * (temperature ** 2)

    # -- reporting ---------------------------------------------------------------------------
    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def describe(self, values: dict[str, float]) -> str:
        """``acc 94.80%  top5 99.60%`` for a console line."""
        parts = []
        for m in self.metrics:
            if m.name in values:
                unit = "%" if m.percent_of_samples else ""
                parts.append(f"{m.name} {values[m.name]:.2f}{unit}")
        return "  ".join(parts)
