"""The Tune trainable: one sweep point -> one QAT trial.

Each trial composes its own config with Hydra (base overrides + its point) and runs it:

- ``trainer.num_workers`` 0 or 1: inside this Tune trial actor, with the CPUs/GPUs the actor
  was given (``sweep/resources.py``), reporting to Tune directly. No second worker group, and
  Tune reuses the actor for the next trial, so imports and data stay warm.
- more workers: the Ray Train V2 pattern. This function builds the trial's ``TorchTrainer``
  (through ``run_trial``) and ``TuneReportCallback`` forwards rank 0's reports to Tune.

Every name a trial derives is a function of its Tune trial id, which ``Tuner.restore`` keeps,
so a resumed sweep finds each trial's checkpoints and MLflow child run again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..app_config import trial_config
from .compose import Composer
from .naming import trial_run_name
from .space import SearchSpace


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (plain values: it crosses process boundaries)."""

    sweep_name: str
    sweep_dir: str  # absolute: Tune's experiment directory
    tracking_uri: str
    experiment: str
    parent_run_id: str
    numbered: bool  # points may repeat: trial names get "#n"
    tags: dict[str, str] = field(default_factory=dict)  # source/git tags, copied to every child

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trial_number(trial_id: str) -> int | None:
    """``"b0ff0_00003"`` -> 4: grid/random trials are numbered from 0 (searchers' ids are not)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) + 1 if "_" in trial_id and tail.isdigit() else None


def trial_output_dir(sweep_dir: str, trial_id: str) -> str:
    return f"{sweep_dir}/trials/{trial_id}"


def build_trial_config(composer: Composer, space: SearchSpace, point: dict[str, Any], ctx: SweepContext,
                       trial_id: str):
    """The full ``TrialConfig`` of the sweep trial ``trial_id`` at ``point``."""
    app = composer.compose(space.overrides(point))
    cfg = trial_config(app, trial_output_dir(ctx.sweep_dir, trial_id))
    if not cfg.trainer.storage_path:
        cfg.trainer.storage_path = f"{ctx.sweep_dir}/train"
    cfg.tracking.uri = ctx.tracking_uri
    cfg.tracking.experiment = ctx.experiment
    cfg.tracking.parent_run_id = ctx.parent_run_id
    cfg.tracking.trial_id = f"{ctx.sweep_name}-{trial_id}"
    cfg.tracking.run_name = trial_run_name(cfg, point, trial_number(trial_id) if ctx.numbered else None)
    return cfg


def sweep_trial(config: dict[str, Any], composer: Composer, space: SearchSpace, ctx: dict[str, Any]) -> None:
    """Tune function trainable; ``config`` is the sampled point (keys as Hydra overrides name them)."""
    from ray import tune

    from ..train.launcher import TrialFailed, run_trial

    context = SweepContext(**ctx)
    point = dict(config)
    cfg = build_trial_config(composer, space, point, context, tune.get_context().get_trial_id())
    tags = {**context.tags, "qat.sweep_name": context.sweep_name}
    try:
        if cfg.trainer.num_workers <= 1:
            run_trial(cfg, on_report=tune.report, in_actor=True, swept=point, extra_tags=tags)
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            run_trial(cfg, callbacks=[TuneReportCallback()], swept=point, extra_tags=tags)
    except TrialFailed as exc:
        if exc.status != "diverged":
            raise
        # A diverged trial ended itself and reported its final status: a result, not a crash
        # for Tune to retry.

