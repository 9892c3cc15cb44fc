"""The Tune trainable: one sweep point -> one QAT trial (Ray Train V2 pattern).

A Tune trial is a function that builds the trial's ``TorchTrainer`` (through ``run_trial``)
and forwards rank 0's reports to Tune with ``TuneReportCallback``. Every name it derives is a
function of the Tune trial id, which ``Tuner.restore`` keeps, so a resumed sweep finds each
trial's checkpoints and MLflow child run again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..train.config import TrialConfig
from .spec import apply_point


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (plain values: it crosses process boundaries)."""

    sweep_name: str
    sweep_dir: str  # absolute: Tune's experiment directory
    tracking_uri: str
    experiment: str
    parent_run_id: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def point_label(point: dict[str, Any]) -> str:
    """``lr=0.001 epochs=2 range_learning=True`` for a sweep point."""
    parts = []
    for key, value in sorted(point.items()):
        short = key.split(".", 1)[1]
        parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)


def trial_config_for(base: dict[str, Any], point: dict[str, Any], ctx: SweepContext, trial_id: str,
                     trial_name: str) -> TrialConfig:
    """The full config of the sweep trial ``trial_id`` at ``point``."""
    cfg = apply_point(base, point)
    cfg["output_dir"] = f"{ctx.sweep_dir}/qat/{trial_name}"
    cfg["trainer"]["storage_path"] = f"{ctx.sweep_dir}/train"
    cfg["tracking"].update(uri=ctx.tracking_uri, experiment=ctx.experiment, parent_run_id=ctx.parent_run_id,
                           trial_id=f"{ctx.sweep_name}-{trial_id}",
                           run_name=f"{trial_name} {point_label(point)}".strip())
    return TrialConfig.from_dict(cfg)


def sweep_trial(config: dict[str, Any], base: dict[str, Any], ctx: dict[str, str]) -> None:
    """Tune function trainable; ``config`` is the sampled point (flat dotted keys)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.launcher import run_trial

    context = tune.get_context()
    cfg = trial_config_for(base, dict(config), SweepContext(**ctx), context.get_trial_id(),
                           context.get_trial_name())
    if cfg.trainer.num_workers == 0:
        run_trial(cfg, on_report=tune.report)
    else:
        run_trial(cfg, callbacks=[TuneReportCallback()])
