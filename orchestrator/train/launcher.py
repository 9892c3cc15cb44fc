"""The trial driver: prepare, open the MLflow run, run the workers, close the run.

``run_trial(cfg)`` runs one trial in this process (``trainer.num_workers=0``, or a sweep trial
with one worker inside its Tune trial actor) or on Ray Train DDP workers, and returns a
``TrialResult``. The MLflow run is created here (once, found again by its trial id on a
restart) with its params, tags and config; system metrics are sampled while it trains; rank 0
logs its metrics and artifacts; this driver sets its final status and ``qat.outcome``.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import interrupts
from ..tracking.mlflow_runs import TRIAL_ID_TAG, RunLogger, default_tracking_uri, find_or_create_run, trial_outcome
from ..tracking.preflight import TrackingUnavailable, check_tracking
from ..tracking.run_content import FAILURE_REASON_TAG, OUTCOME_TAG, trial_params, trial_tags
from ..tracking.system_metrics import system_metrics
from .builders import build_data, load_pretrained, new_model, pretrained_path, task_of
from .config import TrialConfig, TrialConfigError
from .data_checks import check_data
from .labels import bits_label, mode_label
from .identity import (FINGERPRINT_TAG, RunIdentity, RunMismatch, archive, check_output_dir, mismatch_message,
                       run_identity, write_identity)


class TrialFailed(RuntimeError):
    """The trial did not finish; the message says why (divergence, worker failures, ...).

    ``status``: the trial's own final status when it ended itself (``diverged``), else None."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class TrialResult:
    status: str  # "finished"
    metrics: dict[str, Any]
    run_id: str | None
    tracking_uri: str
    output_dir: str
    config: TrialConfig = field(repr=False)


def default_run_name(cfg: TrialConfig) -> str:
    return (f"{cfg.model.name}-{cfg.data.name}-{bits_label(cfg).upper()}-{mode_label(cfg)}"
            f"-lr{cfg.qat.lr:g}-e{cfg.qat.epochs}")


def prepare(cfg: TrialConfig, log=print) -> TrialConfig:
    """``checked(cfg)``'s config, for a config that runs no trial of its own (a sweep's base)."""
    return checked(cfg, log)[0]


def checked(cfg: TrialConfig, log=print, point: dict[str, Any] | None = None) -> tuple[TrialConfig, RunIdentity]:
    """A copy with absolute paths, a tracking URI, a trial id, the pretrained checkpoint path and
    the run's fingerprint, after every check that can fail before the trial runs: the tracking
    server, the run's identity (``identity.py``: a resume or rerun of another config is refused),
    the task, the checkpoint, the data (``data_checks.py``) and ``quant.leaf_modules``. Nothing is
    written but the FP32 baseline's cache. ``point``: a sweep trial's point (part of its identity)."""
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
    try:
        check_tracking(cfg.tracking.uri)
    except TrackingUnavailable as exc:
        raise TrialConfigError(str(exc)) from None
    identity = run_identity(cfg, point)
    if not cfg.qat.restart:
        check_output_dir(cfg.output_dir, identity, _describe_run(cfg), _rename_key(cfg))
    task = task_of(cfg.task)  # a task that cannot be built fails here, before any run exists
    data = build_data(cfg.data)
    given = bool(cfg.model.checkpoint)
    if not given:  # the data is checked before a baseline is trained on it (a fresh model has its outputs)
        check_data(task, data, new_model(cfg.model, data), cfg.qat.batch_size)
    cfg.model.checkpoint, _ = pretrained_path(cfg.model, cfg.data, cfg.task, data, log=log)
    model = load_pretrained(cfg.model, data, cfg.model.checkpoint)  # the checkpoint fits the model
    if given:
        check_data(task, data, model, cfg.qat.batch_size)
    check_leaf_modules(cfg, model)
    cfg.fingerprint = identity.fingerprint
    return cfg, identity


def claim(cfg: TrialConfig, identity: RunIdentity, log=print) -> None:
    """The output directory becomes this run's: ``identity.json`` written (with ``qat.restart`` the
    earlier outputs are archived first). Called once every check has passed."""
    if cfg.qat.restart:
        moved = archive(_run_paths(cfg))
        if moved:
            log(f"qat.restart: earlier outputs moved to {', '.join(moved)}")
    write_identity(cfg.output_dir, identity)


def _rename_key(cfg: TrialConfig) -> str:
    return "sweep.name" if cfg.tracking.parent_run_id else "name"


def _describe_run(cfg: TrialConfig) -> str:
    return f"run {cfg.tracking.run_name!r} ({cfg.output_dir})"


def _run_paths(cfg: TrialConfig) -> list[str]:
    """What a run leaves on local disk: its output directory and, when stored elsewhere, its Ray
    Train checkpoints."""
    from .ray_launcher import run_name_of, storage_of

    paths = [cfg.output_dir]
    ray_dir = f"{storage_of(cfg).rstrip('/')}/{run_name_of(cfg)}"
    if "://" not in ray_dir and not Path(ray_dir).resolve().is_relative_to(Path(cfg.output_dir)):
        paths.append(ray_dir)
    return paths


def check_leaf_modules(cfg: TrialConfig, model) -> None:
    """Every ``quant.leaf_modules`` name is a submodule of the model."""
    names = {name for name, _ in model.named_modules() if name}
    for leaf in cfg.quant.leaf_modules:
        if leaf not in names:
            shown = ", ".join(sorted(names)[:12]) + (", ..." if len(names) > 12 else "")
            raise TrialConfigError(f"quant.leaf_modules: {leaf!r} is not a submodule of model {cfg.model.name!r}; "
                                   f"its submodules: {shown}")


LAUNCHERS = ("in-process", "tune-actor", "ray-train")


def launcher_for(cfg: TrialConfig, in_actor: bool) -> str:
    """Where the trial trains: ``tune-actor`` (a sweep trial with at most one worker: inside its
    Tune trial actor, with the resources that actor holds), ``in-process`` (``num_workers=0``),
    else ``ray-train`` (a TorchTrainer worker group, DDP when ``num_workers > 1``)."""
    if in_actor and cfg.trainer.num_workers <= 1:
        return "tune-actor"
    return "in-process" if cfg.trainer.num_workers == 0 else "ray-train"


def start_run(cfg: TrialConfig, launcher: str, swept: dict[str, Any] | None = None,
              extra_tags: dict[str, str] | None = None) -> str:
    """The trial's MLflow run: created with its params, tags and ``config.json``, or found again
    by its trial id (a restarted trial), with the labels of the earlier attempt removed."""
    tags = {**trial_tags(cfg, launcher), **(extra_tags or {}), FINGERPRINT_TAG: cfg.fingerprint or ""}
    run_id, created = find_or_create_run(cfg.tracking.uri, cfg.tracking.experiment, TRIAL_ID_TAG,
                                         cfg.tracking.trial_id, cfg.tracking.run_name, tags,
                                         cfg.tracking.parent_run_id)
    logger = RunLogger(cfg.tracking.uri, run_id)
    if created:
        logger.log_params(trial_params(cfg, swept))
        logger.log_dict(cfg.to_dict(), "config.json")
    else:
        logger.delete_tags([OUTCOME_TAG, FAILURE_REASON_TAG])
    return run_id


def _runs_of_trial(cfg: TrialConfig) -> list:
    from ..tracking.mlflow_runs import client, ensure_experiment, retrying

    experiment_id = ensure_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    c = client(cfg.tracking.uri)
    return retrying(lambda: c.search_runs([experiment_id],
                                          filter_string=f"tags.`{TRIAL_ID_TAG}` = '{cfg.tracking.trial_id}'"))


def check_tracked_identity(cfg: TrialConfig) -> None:
    """The MLflow side of the identity check (a shared server that outlived the local outputs):
    a run of this trial id recorded with another fingerprint is refused, naming the params that differ."""
    for run in _runs_of_trial(cfg):
        recorded = run.data.tags.get(FINGERPRINT_TAG)
        if recorded and cfg.fingerprint and recorded != cfg.fingerprint:
            params = trial_params(cfg)
            old = {k: v for k, v in run.data.params.items() if k in params}
            raise RunMismatch(mismatch_message(f"{_describe_run(cfg)}: MLflow run {run.info.run_id}",
                                               _recorded(recorded, old), _recorded(cfg.fingerprint, params),
                                               _rename_key(cfg)))


def _recorded(fingerprint: str, params: dict[str, Any]):
    from .identity import RunIdentity

    return RunIdentity(fingerprint, params)


def archive_runs(cfg: TrialConfig) -> None:
    """``qat.restart``: earlier MLflow runs of this trial id keep their history under an archived
    trial id, so the restarted trial gets a run of its own."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for run in _runs_of_trial(cfg):
        logger = RunLogger(cfg.tracking.uri, run.info.run_id)
        logger.set_tags({TRIAL_ID_TAG: f"{cfg.tracking.trial_id}.archived-{stamp}"})
        if run.info.status == "RUNNING":
            logger.end("interrupted", "archived by qat.restart=true")


def run_trial(cfg: TrialConfig, callbacks: list | None = None, on_report=None, log=print, *, in_actor: bool = False,
              swept: dict[str, Any] | None = None, extra_tags: dict[str, str] | None = None) -> TrialResult:
    """Run one trial end to end; raises ``TrialFailed`` (MLflow run FAILED) when it does not finish.

    ``callbacks``: Ray Train callbacks (a multi-worker sweep trial's ``TuneReportCallback``);
    ``on_report``: called with each report's metrics when the trial trains in this process
    (in-process, or inside a Tune trial actor with ``in_actor``). ``swept``: the sweep point
    (logged as params); ``extra_tags``: more run tags (sweep name, source).
    """
    started_at = time.time()  # for the startup_s metric: trial start to first optimizer step
    cfg, identity = checked(cfg, log=log, point=swept)
    launcher = launcher_for(cfg, in_actor)
    if launcher == "ray-train":
        from .ray_launcher import check_fits, check_local_capacity, ensure_ray

        check_local_capacity(cfg.trainer)
        started = ensure_ray(cfg.trainer.ray_address)
        interrupts.reinstall()  # Ray's core worker replaced the SIGTERM handler with one that aborts
        check_fits(cfg.trainer, started)
    if cfg.qat.restart:
        archive_runs(cfg)
    else:
        check_tracked_identity(cfg)
    claim(cfg, identity, log=log)
    run_id = start_run(cfg, launcher, swept, extra_tags)
    tracker = RunLogger(cfg.tracking.uri, run_id)
    payload = {"trial": cfg.to_dict(), "run_id": run_id, "local": launcher != "ray-train",
               "device": "cuda" if cfg.trainer.use_gpu else "cpu", "started_at": started_at}
    closed: list[str] = []

    def report(metrics: dict[str, Any]) -> None:
        # The final report carries the trial's status. The run is closed before it goes out: a
        # sweep's scheduler or Tune itself may stop the trial right at that report.
        if "status" in metrics and not closed:
            closed.append(_close(tracker, metrics["status"], metrics.get("error")))
        if on_report is not None:
            on_report(metrics)

    with system_metrics(cfg.tracking.uri, run_id):
        try:
            if launcher == "ray-train":
                from .ray_launcher import fit, run_name_of

                metrics = fit(cfg, payload, run_name=run_name_of(cfg), callbacks=callbacks)
            else:
                from .workflow import qat_worker

                metrics = qat_worker(payload, on_report=report)
        except KeyboardInterrupt:
            tracker.end("interrupted", f"interrupted ({interrupts.STATE.signal_name})", best_effort=True)
            raise
        except Exception as exc:
            tracker.end("failed", f"{type(exc).__name__}: {_first_line(exc)}", best_effort=True)
            raise TrialFailed(f"trial {cfg.tracking.run_name} failed: {_first_line(exc)}") from exc
    status = metrics.get("status")
    if not closed:
        _close(tracker, status, metrics.get("error"))
    if status != "finished":
        raise TrialFailed(metrics.get("error") or f"trial ended with status {status!r}", status=status)
    return TrialResult("finished", metrics, run_id, cfg.tracking.uri, cfg.output_dir, cfg)


def _close(tracker: RunLogger, status: str | None, reason: str | None = None) -> str:
    """End the run as the trial's final report says (``status``); returns the outcome."""
    outcome = trial_outcome(status)
    tracker.end(outcome, reason, best_effort=outcome != "finished")
    return outcome


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
