"""The trial driver: prepare, open the MLflow run, run the workers, close the run.

``run_trial(cfg)`` runs one trial in-process (``trainer.num_workers=0``) or on Ray Train DDP
workers, and returns a ``TrialResult``. The MLflow run is created here (once, found again by
its trial id on a restart); rank 0 logs into it; this driver sets its final status.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tracking.mlflow_runs import KIND_TAG, TRIAL_ID_TAG, RunLogger, default_tracking_uri, find_or_create_run
from .builders import build_data, pretrained_path
from .config import TrialConfig


class TrialFailed(RuntimeError):
    """The trial did not finish; the message says why (divergence, worker failures, ...)."""


@dataclass
class TrialResult:
    status: str  # "finished"
    metrics: dict[str, Any]
    run_id: str | None
    tracking_uri: str
    output_dir: str
    config: TrialConfig = field(repr=False)


def mode_name(cfg: TrialConfig) -> str:
    return "range_learning" if cfg.qat.range_learning else "static"


def default_run_name(cfg: TrialConfig) -> str:
    return (f"{cfg.model.name}-{cfg.data.name}-W{cfg.quant.param_bw}A{cfg.quant.output_bw}-{mode_name(cfg)}"
            f"-lr{cfg.qat.lr:g}-e{cfg.qat.epochs}")


def prepare(cfg: TrialConfig, log=print) -> TrialConfig:
    """A copy with absolute paths, a tracking URI, a trial id and the pretrained checkpoint path."""
    cfg = copy.deepcopy(cfg).validate()
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if not cfg.tracking.uri:
        cfg.tracking.uri = default_tracking_uri(cfg.output_dir)
    if not cfg.tracking.trial_id:
        cfg.tracking.trial_id = hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:16]
    if not cfg.tracking.run_name:
        cfg.tracking.run_name = default_run_name(cfg)
    if cfg.trainer.storage_path and "://" not in cfg.trainer.storage_path:
        cfg.trainer.storage_path = str(Path(cfg.trainer.storage_path).expanduser().resolve())
    data = build_data(cfg.data)
    cfg.model.checkpoint, _ = pretrained_path(cfg.model, cfg.data, data, log=log)
    return cfg


def trial_tags(cfg: TrialConfig) -> dict[str, str]:
    return {KIND_TAG: "trial", "qat.mode": mode_name(cfg), "qat.param_bw": str(cfg.quant.param_bw),
            "qat.output_bw": str(cfg.quant.output_bw), "qat.model": cfg.model.name, "qat.data": cfg.data.name,
            "qat.output_dir": cfg.output_dir}


def start_run(cfg: TrialConfig) -> str:
    run_id, _ = find_or_create_run(cfg.tracking.uri, cfg.tracking.experiment, TRIAL_ID_TAG, cfg.tracking.trial_id,
                                   cfg.tracking.run_name, trial_tags(cfg), cfg.tracking.parent_run_id)
    return run_id


def run_trial(cfg: TrialConfig, callbacks: list | None = None, on_report=None, log=print) -> TrialResult:
    """Run one trial end to end; raises ``TrialFailed`` (MLflow run FAILED) when it does not finish.

    ``callbacks``: Ray Train callbacks (the sweep's ``TuneReportCallback``); ``on_report``: the
    same role for in-process trials, called with each report's metrics.
    """
    started_at = time.time()  # for the startup_s metric: trial start to first optimizer step
    cfg = prepare(cfg, log=log)
    if cfg.trainer.num_workers > 0:
        from .ray_launcher import check_fits, ensure_ray

        check_fits(cfg.trainer, ensure_ray(cfg.trainer.ray_address))
    run_id = start_run(cfg)
    tracker = RunLogger(cfg.tracking.uri, run_id)
    payload = {"trial": cfg.to_dict(), "run_id": run_id, "local": cfg.trainer.num_workers == 0,
               "started_at": started_at}
    try:
        if cfg.trainer.num_workers == 0:
            from .workflow import qat_worker

            metrics = qat_worker(payload, on_report=on_report)
        else:
            from .ray_launcher import fit

            metrics = fit(cfg, payload, run_name=f"trial-{cfg.tracking.trial_id}", callbacks=callbacks)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except Exception as exc:
        tracker.finish("FAILED")
        raise TrialFailed(f"trial {cfg.tracking.run_name} failed: {_first_line(exc)}") from exc
    if metrics.get("status") != "finished":
        tracker.finish("FAILED")
        raise TrialFailed(metrics.get("error") or f"trial ended with status {metrics.get('status')!r}")
    tracker.finish("FINISHED")
    return TrialResult("finished", metrics, run_id, cfg.tracking.uri, cfg.output_dir, cfg)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
