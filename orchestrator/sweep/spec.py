"""SweepSpec: the ``sweep`` node of a Hydra config, validated without importing Ray.

``space`` maps ``section -> key -> distribution`` over trial config keys, one of
``{grid: [...]}`` (every value, crossed with the other grids), ``{choice: [...]}``,
``{loguniform: [low, high]}`` or ``{uniform: [low, high]}`` (drawn ``num_samples`` times).
The pseudo key ``quant.bits`` takes ``"w4a8"``-style strings and sets both bit widths.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..train.config import SECTIONS, TrialConfig, TrialConfigError

DISTRIBUTIONS = ("grid", "choice", "loguniform", "uniform")
SCHEDULERS = ("none", "asha")
BITS_PATTERN = re.compile(r"^w(\d+)a(\d+)$")
SWEEPABLE_SECTIONS = ("model", "data", "quant", "qat", "trainer")


@dataclass
class SweepSpec:
    """A sweep: search space, sampling, scheduler, concurrency and resume.

    ``metric``/``mode``: what ranks trials (and what ASHA watches, per epoch).
    ``max_concurrent_trials``: empty means as many as the cluster's CPUs (GPUs with
    ``trainer.use_gpu``) hold, given each trial's workers.
    ``trial_driver_cpus``: CPUs reserved for each trial's driver (it mostly waits; 0 on a laptop).
    """

    name: str = "default"
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    scheduler: str = "none"
    metric: str = "val_acc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: Optional[int] = None
    trial_driver_cpus: float = 0.0
    resume: bool = False

    def validate(self) -> SweepSpec:
        def require(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                raise TrialConfigError(f"sweep.{key}={value!r} is not allowed; allowed: {allowed}")

        require(isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or "") is not None,
                "name", self.name, "letters, digits, '_', '-', '.'")
        require(isinstance(self.num_samples, int) and self.num_samples >= 1, "num_samples", self.num_samples,
                "an integer >= 1")
        require(self.scheduler in SCHEDULERS, "scheduler", self.scheduler, ", ".join(SCHEDULERS))
        require(self.metric in ("val_acc", "test_acc", "train_loss"), "metric", self.metric,
                "val_acc, test_acc, train_loss")
        require(self.mode in ("max", "min"), "mode", self.mode, "max, min")
        require(isinstance(self.grace_period, int) and self.grace_period >= 1, "grace_period", self.grace_period,
                "an integer >= 1")
        require(isinstance(self.reduction_factor, int) and self.reduction_factor >= 2, "reduction_factor",
                self.reduction_factor, "an integer >= 2")
        require(self.max_concurrent_trials is None or (isinstance(self.max_concurrent_trials, int)
                                                       and self.max_concurrent_trials >= 1),
                "max_concurrent_trials", self.max_concurrent_trials, "empty or an integer >= 1")
        require(isinstance(self.trial_driver_cpus, (int, float)) and self.trial_driver_cpus >= 0,
                "trial_driver_cpus", self.trial_driver_cpus, "a number >= 0")
        for key, dist in flat_space(self.space).items():
            _check_distribution(key, dist)
        return self


def flat_space(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"qat": {"lr": {...}}}`` -> ``{"qat.lr": {...}}``, checking that the keys exist."""
    out = {}
    for section, entries in (space or {}).items():
        if section not in SWEEPABLE_SECTIONS:
            raise TrialConfigError(f"sweep.space.{section} is not a sweepable section; allowed: "
                                   f"{', '.join(SWEEPABLE_SECTIONS)}")
        if not isinstance(entries, dict):
            raise TrialConfigError(f"sweep.space.{section} must map keys to distributions, got {entries!r}")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if section == "quant":
            known.add("bits")
        for key, dist in entries.items():
            if key not in known:
                raise TrialConfigError(f"sweep.space.{section}.{key}: {section} has no key {key!r}; allowed: "
                                       f"{', '.join(sorted(known))}")
            out[f"{section}.{key}"] = dist
    return out


def _check_distribution(key: str, dist: Any) -> None:
    where = f"sweep.space.{key}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise TrialConfigError(f"{where}={dist!r} must be one of {{grid: [...]}}, {{choice: [...]}}, "
                               "{loguniform: [low, high]}, {uniform: [low, high]}")
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list) or not values:
        raise TrialConfigError(f"{where}.{kind}={values!r} must be a non-empty list")
    if kind in ("loguniform", "uniform"):
        ok = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ok = ok and values[0] < values[1] and (kind == "uniform" or values[0] > 0)
        if not ok:
            raise TrialConfigError(f"{where}.{kind}={values!r} must be [low, high] with "
                                   f"{'0 < ' if kind == 'loguniform' else ''}low < high")


def apply_point(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """A copy of the trial-config dict ``base`` with ``{"qat.lr": 1e-3, "quant.bits": "w4a4"}`` set."""
    import copy

    cfg = copy.deepcopy(base)
    for key, value in point.items():
        section, name = key.split(".", 1)
        if key == "quant.bits":
            match = BITS_PATTERN.match(str(value))
            if not match:
                raise TrialConfigError(f"sweep.space.quant.bits value {value!r} must look like 'w4a8'")
            cfg["quant"]["param_bw"], cfg["quant"]["output_bw"] = int(match.group(1)), int(match.group(2))
        else:
            cfg[section][name] = value
    return cfg


def check_points(base: dict[str, Any], space: dict[str, Any]) -> int:
    """Validate every grid point and every choice/bound as a whole trial config; return the grid size."""
    flat = flat_space(space)
    grid = {k: d["grid"] for k, d in flat.items() if "grid" in d}
    for key, dist in flat.items():
        kind, values = next(iter(dist.items()))
        if kind != "grid":
            for v in values:
                _validate(base, {key: v}, key)
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        _validate(base, point, ", ".join(f"{k}={v!r}" for k, v in point.items()))
    size = 1
    for values in grid.values():
        size *= len(values)
    return size


def _validate(base: dict[str, Any], point: dict[str, Any], where: str) -> None:
    try:
        TrialConfig.from_dict(apply_point(base, point)).validate()
    except TrialConfigError as exc:
        raise TrialConfigError(f"sweep point ({where}): {exc}") from None


def tune_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune's ``param_space`` (flat dotted keys) for ``space``."""
    from ray import tune

    makers = {"grid": tune.grid_search, "choice": tune.choice,
              "loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v)}
    return {key: makers[kind](values) for key, dist in flat_space(space).items() for kind, values in dist.items()}
