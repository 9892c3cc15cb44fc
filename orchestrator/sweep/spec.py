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
    3 brackets). ``metric``: the validation metric to select on, ``val_<m>`` for a metric ``m`` of
    the task (empty: the task's primary one, ``val_acc`` for classification, ``val_ppl`` for
    language modelling); test metrics are reported for every trial, never optimised (selecting on
    them would leak the test set). Its direction (``mode``) is the task's.
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
    metric: Optional[str] = None
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
        """``max`` or ``min``: set with the metric by ``select_metric``."""
        return self.__dict__.get("_mode", "max")

    @property
    def tie_on_samples(self) -> bool:
        """The metric is a percentage of samples: differences within one sample are ties."""
        return self.__dict__.get("_percent", True)

    def select_metric(self, task) -> SweepSpec:
        """Resolve ``metric`` against ``task`` (an ``orchestrator.tasks.Task``): the task's primary
        validation metric when empty; else it must be ``val_<m>`` for one of the task's metrics."""
        names = [m.name for m in task.metrics]
        allowed = ", ".join(f"val_{n}" for n in names)
        if self.metric is None:
            self.metric = f"val_{task.primary}"
        elif isinstance(self.metric, str) and self.metric.startswith("test_"):
            raise TrialConfigError(f"sweep.metric={self.metric!r} is not allowed; allowed: {allowed} (test metrics "
                                   "are reported for every trial, never optimised)")
        name = self.metric[len("val_"):] if isinstance(self.metric, str) and self.metric.startswith("val_") else None
        if name not in names:
            raise TrialConfigError(f"sweep.metric={self.metric!r} is not allowed; allowed: {allowed}")
        metric = task.metric(name)
        self.__dict__["_mode"], self.__dict__["_percent"] = metric.mode, metric.percent_of_samples
        return self

    def validate(self) -> SweepSpec:
        def require(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                raise TrialConfigError(f"sweep.{key}={value!r} is not allowed; allowed: {allowed}")

        require(isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or "") is not None,
                "name", self.name, "letters, digits, '_', '-', '.'")
        require(self.search in SEARCHES, "search", self.search, ", ".join(SEARCHES))
        require(_is_int(self.num_samples) and self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        require(self.scheduler in SCHEDULERS, "scheduler", self.scheduler, ", ".join(SCHEDULERS))
        require(self.metric is None or (isinstance(self.metric, str) and self.metric.startswith(("val_", "test_"))),
                "metric", self.metric, "empty (the task's primary validation metric) or val_<metric>")
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
