"""The optimizer and the learning-rate schedule of a trial: ``_target_`` partials, and the presets
(``qat.optimizer=adam``, ``qat.schedule=cosine``) that are named partials of the same form.

A partial is a mapping ``{_target_: dotted.path, **kwargs}`` (Hydra's form, resolved here without
Hydra). The optimizer gets two parameter groups: the model's weights at ``qat.lr`` with
``qat.weight_decay``, and the trainable encodings (range learning) at ``qat.encoding_lr`` without
decay (decay would shrink ranges). A schedule steps once per epoch or once per optimizer step
(its ``interval``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import TrialConfigError

OPTIMIZER_PRESETS = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}
SCHEDULE_PRESETS = ("cosine", "step", "constant", "warmup_cosine", "onecycle")
INTERVALS = ("epoch", "step")


def _is_partial(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("_target_"), str) and bool(value["_target_"])


def check_optimizer(value: Any) -> None:
    if not ((isinstance(value, str) and value in OPTIMIZER_PRESETS) or _is_partial(value)):
        raise TrialConfigError(f"qat.optimizer={value!r} is not allowed; allowed: {', '.join(OPTIMIZER_PRESETS)}, "
                               "or a mapping with _target_ (a torch.optim.Optimizer class) and its arguments")


def check_schedule(value: Any) -> None:
    if not ((isinstance(value, str) and value in SCHEDULE_PRESETS) or _is_partial(value)):
        raise TrialConfigError(f"qat.schedule={value!r} is not allowed; allowed: {', '.join(SCHEDULE_PRESETS)}, "
                               "or a mapping with _target_ (an LR scheduler class or function) and its arguments")
    if _is_partial(value) and value.get("interval", "epoch") not in INTERVALS:
        raise TrialConfigError(f"qat.schedule.interval={value['interval']!r} is not allowed; allowed: "
                               f"{', '.join(INTERVALS)}")


def locate(path: str, key: str) -> Any:
    """The object at dotted ``path`` (``torch.optim.AdamW``); errors name ``key``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise TrialConfigError(f"{key}._target_={path!r} is not allowed; allowed: a dotted path such as "
                               "'torch.optim.AdamW'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        # a class nested one level deeper (``pkg.module.Class.method``) is not supported: say so plainly
        raise TrialConfigError(f"{key}._target_={path!r} cannot be imported: {exc}") from None


def split_partial(value: dict[str, Any], key: str) -> tuple[Any, dict[str, Any]]:
    """``(callable, kwargs)`` of a ``_target_`` partial."""
    kwargs = {k: v for k, v in value.items() if k != "_target_"}
    return locate(value["_target_"], key), kwargs


def optimizer_partial(qat) -> dict[str, Any]:
    """``qat.optimizer`` as a partial (a preset expanded: ``sgd`` takes ``qat.momentum``)."""
    if _is_partial(qat.optimizer):
        return dict(qat.optimizer)
    partial: dict[str, Any] = {"_target_": OPTIMIZER_PRESETS[qat.optimizer]}
    if qat.optimizer == "sgd":
        partial["momentum"] = qat.momentum
    return partial


def make_optimizer(qat, model_params: list, encoding_group: dict[str, Any] | None) -> torch.optim.Optimizer:
    """The optimizer over the weights' group and (when any) the encodings' own group
    (``sim.encoding_param_group(qat.encoding_lr)``)."""
    groups = [{"params": model_params, "weight_decay": qat.weight_decay, "lr": qat.lr}]
    if encoding_group is not None:
        groups.append(encoding_group)
    cls, kwargs = split_partial(optimizer_partial(qat), "qat.optimizer")
    try:
        optimizer = cls(groups, **{"lr": qat.lr, **kwargs})
    except TypeError as exc:
        raise TrialConfigError(f"qat.optimizer={qat.optimizer!r} does not fit {cls!r}: {exc}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TrialConfigError(f"qat.optimizer._target_ built a {type(optimizer).__name__}, expected a "
                               "torch.optim.Optimizer")
    return optimizer


@dataclass
class Schedule:
    """A scheduler and when it steps (``interval``: ``epoch`` or ``step``)."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    interval: str


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ``1/(warmup_steps+1)`` of each group's lr to all of it over ``warmup_steps``
    steps, then cosine to 0 at ``total_steps``."""
    warm, total = max(warmup_steps, 0), max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        span = max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, **kwargs: Any) -> torch.optim.lr_scheduler.OneCycleLR:
    """``OneCycleLR`` peaking at each group's own lr (weights and encodings keep their ratio)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                               total_steps=max(total_steps, 1), **kwargs)


def schedule_partial(qat) -> dict[str, Any]:
    """``qat.schedule`` as a partial with its ``interval`` (presets expanded)."""
    s = qat.schedule
    if _is_partial(s):
        return {"interval": "epoch", **s}
    if s == "cosine":
        return {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": max(qat.epochs, 1),
                "interval": "epoch"}
    if s == "step":
        return {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": qat.lr_step_epochs,
                "gamma": 1.0 / qat.lr_gamma, "interval": "epoch"}
    if s == "constant":
        return {"_target_": "torch.optim.lr_scheduler.ConstantLR", "factor": 1.0, "total_iters": 0,
                "interval": "epoch"}
    if s == "warmup_cosine":
        return {"_target_": "orchestrator.train.optim.warmup_cosine", "warmup_steps": qat.warmup_steps,
                "interval": "step"}
    return {"_target_": "orchestrator.train.optim.one_cycle", "interval": "step"}


def make_schedule(qat, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None) -> Schedule:
    """The trial's schedule. ``total_steps`` (epochs, or optimizer steps of the whole trial) is passed
    when the target names it; a per-step schedule needs ``steps_per_epoch`` (a map-style train set)."""
    partial = schedule_partial(qat)
    interval = partial.pop("interval")
    fn, kwargs = split_partial(partial, "qat.schedule")
    if interval == "step" and steps_per_epoch is None:
        raise TrialConfigError(f"qat.schedule={qat.schedule!r} steps per optimizer step and needs the number of "
                               "steps per epoch: not known for an iterable training set; use a per-epoch schedule")
    total = qat.epochs if interval == "epoch" else qat.epochs * steps_per_epoch
    try:
        if "total_steps" in inspect.signature(fn).parameters and "total_steps" not in kwargs:
            kwargs["total_steps"] = total
    except (TypeError, ValueError):
        pass
    try:
        scheduler = fn(optimizer, **kwargs)
    except TypeError as exc:
        raise TrialConfigError(f"qat.schedule={qat.schedule!r} does not fit {fn!r}: {exc}") from None
    return Schedule(scheduler, interval)
