"""SweepSpec: the ``sweep`` node of the Hydra apps (how to search; *what* to search is Hydra's).

The search space is written in Hydra's sweep grammar, on the command line or in a preset's
``hydra.sweeper.params`` (``orchestrator/sweep/space.py``); this node only says how Ray Tune
searches it. Validated without importing Ray; every error names the key, the value and what
is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from ..train.config import TrialConfigError

# Metrics a sweep may select on, with their direction: validation metrics only. Test metrics
# are reported for every trial and never optimised (selecting on them would leak the test set).
SELECTION_METRICS = {"val_acc": "max"}
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha", "hyperband")


@dataclass
class SweepSpec:
    """How a sweep runs.

    ``search``: ``grid`` enumerates every discrete sweep (``a,b``, ``choice(...)``, ``range(...)``,
    ``glob(...)``) like Hydra's basic sweeper, and draws ``interval(...)`` values ``num_samples``
    times per grid point; ``random`` draws every dimension ``num_samples`` times; ``optuna``
    runs ``num_samples`` trials chosen by Optuna's TPE sampler.
    ``scheduler``: ``asha`` stops trials whose ``metric`` trails at epoch rungs
    (``grace_period``, ``reduction_factor``); ``hyperband`` is asynchronous HyperBand (ASHA over
    3 brackets). ``metric``: a validation metric (``val_acc``).
    ``max_concurrent_trials``: empty means as many as the cluster's CPUs (GPUs with
    ``trainer.use_gpu``) hold. ``trial_driver_cpus``: CPUs reserved for the driver of a
    multi-worker trial (it mostly waits). ``seed``: the search's random seed (draws, TPE).
    ``verbose``: show Ray's, Tune's and MLflow's own logs and the trials' output.
    ``register_best``: register the best trial's model in the MLflow Model Registry as
    ``registered_model``.
    """

    name: str = "sweep"
    search: str = "grid"
    num_samples: int = 1
    scheduler: str = "none"
    metric: str = "val_acc"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: Optional[int] = None
    trial_driver_cpus: float = 0.0
    seed: int = 0
    resume: bool = False
    verbose: bool = False
    register_best: bool = True
    registered_model: str = "${model.name}-${data.name}-qat"

    @property
    def mode(self) -> str:
        return SELECTION_METRICS[self.metric]

    def validate(self) -> SweepSpec:
        def require(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                raise TrialConfigError(f"sweep.{key}={value!r} is not allowed; allowed: {allowed}")

        require(isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or "") is not None,
                "name", self.name, "letters, digits, '_', '-', '.'")
        require(self.search in SEARCHES, "search", self.search, ", ".join(SEARCHES))
        require(_is_int(self.num_samples) and self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        require(self.scheduler in SCHEDULERS, "scheduler", self.scheduler, ", ".join(SCHEDULERS))
        allowed_metrics = ", ".join(SELECTION_METRICS)
        if isinstance(self.metric, str) and self.metric.startswith("test_"):
            allowed_metrics += " (test metrics are reported for every trial, never optimised)"
        require(self.metric in SELECTION_METRICS, "metric", self.metric, allowed_metrics)
        require(_is_int(self.grace_period) and self.grace_period >= 1, "grace_period", self.grace_period,
                "an integer >= 1")
        require(_is_int(self.reduction_factor) and self.reduction_factor >= 2, "reduction_factor",
                self.reduction_factor, "an integer >= 2")
        require(self.max_concurrent_trials is None or (_is_int(self.max_concurrent_trials)
                                                       and self.max_concurrent_trials >= 1),
                "max_concurrent_trials", self.max_concurrent_trials, "empty or an integer >= 1")
        require(isinstance(self.trial_driver_cpus, (int, float)) and self.trial_driver_cpus >= 0,
                "trial_driver_cpus", self.trial_driver_cpus, "a number >= 0")
        require(_is_int(self.seed), "seed", self.seed, "an integer")
        require(isinstance(self.registered_model, str) and bool(self.registered_model.strip()), "registered_model",
                self.registered_model, "a non-empty model name")
        return self


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
