"""A sweep, checked before Ray starts: its space, settings, base config and every edge point.

``plan_sweep`` composes the base config and, for every value of every swept key (the whole
grid when it is small), the trial config Hydra would compose, and validates each as a trial;
errors name the point, the key, the value and what is allowed. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..app_config import output_root, trial_config
from ..train.builders import task_of
from ..train.config import TrialConfig, TrialConfigError
from ..train.identity import RunMismatch, mismatch_message, read_identity, run_identity
from .compose import Composer
from .space import SearchSpace, parse_space, value_text
from .spec import SweepSpec


@dataclass
class SweepPlan:
    spec: SweepSpec
    space: SearchSpace
    composer: Composer
    base: TrialConfig
    root: Path

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweeps" / self.spec.name

    @property
    def tracking_uri(self) -> str:
        """The sweep's MLflow store (``tracking.uri``, else ``mlflow.db`` under the output root)."""
        from ..tracking.mlflow_runs import default_tracking_uri

        return self.base.tracking.uri or default_tracking_uri(self.root)

    @property
    def total(self) -> int:
        return self.space.grid_size(self.spec.search) * self.spec.num_samples

    def max_epochs(self) -> int:
        """The most epochs any trial can train (ASHA's ``max_t``)."""
        epochs = [self.base.qat.epochs]
        for d in self.space.dims:
            if d.key == "qat.epochs":
                epochs += [int(v) for v in d.edge_values() if isinstance(v, (int, float))]
        return max(epochs)


def sweep_state_exists(sweep_dir: Path) -> bool:
    return (sweep_dir / "tuner.pkl").exists() or any(sweep_dir.glob("experiment_state-*.json"))


def plan_sweep(config_loader, master_config, overrides: list[str]) -> SweepPlan:
    space = parse_space(overrides, config_loader)
    composer = Composer(config_loader, master_config)
    app = composer.compose(space.base)
    try:
        spec = SweepSpec(**app["sweep"]).validate()
    except TypeError as exc:  # an unknown key under sweep (the schema normally catches it first)
        raise TrialConfigError(f"sweep: {exc}") from None
    except TrialConfigError as exc:
        raise TrialConfigError(_as_the_user_set_it(str(exc), overrides)) from None
    root = output_root(app)
    base = trial_config(app, root / "sweeps" / spec.name / "trials" / "_base")
    base.validate()
    spec.select_metric(task_of(base.task))
    for point in space.check_points(spec.search):
        _check(composer, space, point, root)
    if spec.search == "optuna":
        _require_module("optuna", "sweep.search=optuna")
    return SweepPlan(spec, space, composer, base, root)


def check_existing(plan: SweepPlan) -> None:
    """A new sweep's name is free; a resumed sweep exists and each of its trials would be composed
    as it was (``train/identity.py``): a changed config is refused before anything runs, naming the
    trial and the keys that differ. Checked once the sweep's lock is held (``lock.py``), so that a
    second driver of a running sweep is told that it runs, and no driver can start or end meanwhile."""
    spec, sweep_dir = plan.spec, plan.sweep_dir
    exists = sweep_state_exists(sweep_dir)
    if exists and not spec.resume:
        raise TrialConfigError(f"sweep.name={spec.name!r} already exists at {sweep_dir}; pass sweep.resume=true to "
                               "continue it, or choose another sweep.name")
    if spec.resume and not exists:
        raise TrialConfigError(f"sweep.resume=true but there is no sweep {spec.name!r} at {sweep_dir} to resume")
    if spec.resume and not plan.base.qat.restart:
        for trial_dir in sorted((sweep_dir / "trials").glob("*")):
            stored = read_identity(trial_dir)
            if stored is None or stored.point is None:
                continue
            cfg = trial_config(plan.composer.compose(plan.space.overrides(stored.point)), trial_dir)
            current = run_identity(cfg, stored.point)
            if current.fingerprint != stored.fingerprint:
                raise RunMismatch(mismatch_message(f"sweep {spec.name!r}: trial {trial_dir.name}", stored, current,
                                                   "sweep.name"))


def _as_the_user_set_it(message: str, overrides: list[str]) -> str:
    """Under ``qat-train -m`` the sweep's name is ``name`` (``sweep.name: ${name}``): an error about
    ``sweep.name`` names the key the user set."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if message.startswith("sweep.name=") and "name" in keys and "sweep.name" not in keys:
        return "name=" + message[len("sweep.name="):] + " (the sweep's name under -m)"
    return message


def _check(composer: Composer, space: SearchSpace, point: dict[str, Any], root: Path) -> None:
    where = ", ".join(f"{k}={value_text(v)}" for k, v in point.items())
    try:
        trial_config(composer.compose(space.overrides(point)), root / "_check").validate()
    except TrialConfigError as exc:
        raise TrialConfigError(f"sweep point ({where}): {exc}") from None


def _require_module(name: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise TrialConfigError(f"{what} needs the {name} package; pip install {name}")
