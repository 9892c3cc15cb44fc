"""Running a sweep on Ray Tune: validate, open the parent run, fit (or restore), summarise.

Layout under the output root: ``sweeps/<name>/`` is Tune's experiment directory (its state
makes ``sweep.resume=true`` possible), ``sweeps/<name>/qat/<trial>/export`` holds each trial's
export, ``sweeps/<name>/train`` the trials' Ray Train checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tracking.mlflow_runs import (
    KIND_TAG,
    SWEEP_ID_TAG,
    TRIAL_ID_TAG,
    RunLogger,
    default_tracking_uri,
    ensure_experiment,
    find_or_create_run,
    find_run,
    flatten,
)
from ..train.config import TrialConfig, TrialConfigError
from ..train.launcher import prepare
from .spec import SweepSpec, check_points, flat_space, tune_param_space
from .trial import SweepContext, point_label


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: str
    tracking_uri: str
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # sorted, best first
    interrupted: bool = False

    @property
    def best(self) -> dict[str, Any] | None:
        finished = [r for r in self.rows if r["status"] == "finished"]
        return finished[0] if finished else None


# Tune refuses an empty resource request. A trial driver that reserves no CPU asks for this much
# memory instead: a token CPU share would make a trial need e.g. 2.001 CPUs of a 2-CPU node.
DRIVER_TOKEN = {"CPU": 0, "memory": float(1 << 20)}


def sweep_dir_for(root: str | Path, name: str) -> Path:
    return Path(root).resolve() / "sweeps" / name


def validate_sweep(base: TrialConfig, spec: SweepSpec, root: str | Path) -> int:
    """Everything that can be checked before Ray starts; returns the number of grid points."""
    spec.validate()
    base.validate()
    grid = check_points(base.to_dict(), spec.space)
    sweep_dir = sweep_dir_for(root, spec.name)
    exists = (sweep_dir / "tuner.pkl").exists() or any(sweep_dir.glob("experiment_state-*.json"))
    if exists and not spec.resume:
        raise TrialConfigError(
            f"sweep.name={spec.name!r} already exists at {sweep_dir}; pass sweep.resume=true to continue it, "
            "or choose another sweep.name"
        )
    if spec.resume and not exists:
        raise TrialConfigError(f"sweep.resume=true but there is no sweep {spec.name!r} at {sweep_dir} to resume")
    return grid


def _max_concurrent(spec: SweepSpec, base: TrialConfig) -> int:
    import ray

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    t = base.trainer
    resources = ray.cluster_resources()
    if t.use_gpu:
        return max(1, int(resources.get("GPU", 0) // (t.num_workers * t.gpus_per_worker)))
    per_trial = max(t.num_workers, 1) * t.cpus_per_worker
    return max(1, int(resources.get("CPU", 1) // per_trial))


def _trainable(base_dict: dict[str, Any], ctx: SweepContext, spec: SweepSpec, base: TrialConfig):
    from ray import tune

    from .trial import sweep_trial

    cpus = spec.trial_driver_cpus if base.trainer.num_workers > 0 else max(spec.trial_driver_cpus,
                                                                          base.trainer.cpus_per_worker)
    resources = {"CPU": cpus} if cpus > 0 else DRIVER_TOKEN
    return tune.with_resources(tune.with_parameters(sweep_trial, base=base_dict, ctx=ctx.to_dict()), resources)


def _scheduler(spec: SweepSpec, base: TrialConfig, space: dict[str, Any]):
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = [base.qat.epochs]
    for key, dist in flat_space(space).items():
        if key == "qat.epochs":
            epochs += [v for v in next(iter(dist.values())) if isinstance(v, int)]
    return ASHAScheduler(time_attr="training_iteration", max_t=max(epochs) + 1, grace_period=spec.grace_period,
                         reduction_factor=spec.reduction_factor)


def run_sweep(base: TrialConfig, spec: SweepSpec, root: str | Path, log=print) -> SweepOutcome:
    """Run (or resume) the sweep ``spec`` around the trial config ``base``."""
    grid = validate_sweep(base, spec, root)
    root = Path(root).resolve()
    base = copy.deepcopy(base)
    if not base.tracking.uri:
        base.tracking.uri = default_tracking_uri(root)
    base.output_dir = str(sweep_dir_for(root, spec.name) / "qat" / "_base")
    base = prepare(base, log=log)  # trains/caches the FP32 baseline once, before any trial starts
    sweep_dir = sweep_dir_for(root, spec.name)

    from ..train.ray_launcher import check_fits, ensure_ray

    started_locally = ensure_ray(base.trainer.ray_address)
    check_fits(base.trainer, started_locally, extra_cpus=spec.trial_driver_cpus)
    from ray import tune

    uri, experiment = base.tracking.uri, base.tracking.experiment
    sweep_id = f"{spec.name}-{hashlib.sha256(str(sweep_dir).encode()).hexdigest()[:12]}"
    parent_id, created = find_or_create_run(uri, experiment, SWEEP_ID_TAG, sweep_id, f"sweep {spec.name}",
                                            {KIND_TAG: "sweep", "qat.sweep_name": spec.name,
                                             "qat.sweep_dir": str(sweep_dir)})
    parent = RunLogger(uri, parent_id)
    if created:
        parent.log_params({**flatten(base.to_dict()), "sweep.space": json.dumps(spec.space, sort_keys=True),
                           "sweep.num_samples": str(spec.num_samples), "sweep.scheduler": spec.scheduler,
                           "sweep.metric": spec.metric})
    base_dict = base.to_dict()
    base_dict["tracking"]["trial_id"] = None
    base_dict["tracking"]["run_name"] = None
    ctx = SweepContext(spec.name, str(sweep_dir), uri, experiment, parent_id)
    trainable = _trainable(base_dict, ctx, spec, base)
    total = grid * spec.num_samples
    keys = list(flat_space(spec.space))
    from .progress import SweepProgress

    progress = SweepProgress(spec.name, spec.metric, spec.mode, keys, total)
    max_concurrent = _max_concurrent(spec, base)
    log(f"sweep {spec.name}: {total} trial(s), up to {max_concurrent} at a time; Tune state in {sweep_dir}; "
        f"MLflow parent run {parent_id}")
    if spec.resume:  # the RunConfig (progress callback included) comes back from Tune's state
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_param_space(spec.space),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                        scheduler=_scheduler(spec, base, spec.space),
                                        max_concurrent_trials=max_concurrent,
                                        # a trial's actor runs the next trial: its imports (torch,
                                        # MLflow, Ray Train; ~3 s) are already done
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(sweep_dir.parent), callbacks=[progress],
                                      verbose=0),
        )
    try:
        grid_result = tuner.fit()
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    outcome = SweepOutcome(spec.name, str(sweep_dir), uri, parent_id)
    outcome.rows = _rows(grid_result, keys, spec, uri, experiment)
    outcome.interrupted = any(r["status"] == "unfinished" for r in outcome.rows)
    best = outcome.best
    if best is not None:
        parent.log_metrics({f"best_{spec.metric}": best[spec.metric], "best_test_acc": best["test_acc"]}, step=0)
    parent.set_tags({"qat.trials_finished": sum(r["status"] == "finished" for r in outcome.rows),
                     "qat.trials_failed": sum(r["status"] == "failed" for r in outcome.rows)})
    parent.finish("KILLED" if outcome.interrupted else "FINISHED")
    return outcome


def _rows(grid_result, keys: list[str], spec: SweepSpec, uri: str, experiment: str) -> list[dict[str, Any]]:
    """One row per trial (best first); child runs left RUNNING by an early stop are closed."""
    experiment_id = ensure_experiment(uri, experiment)
    interrupted = grid_result.num_terminated + grid_result.num_errors < len(grid_result)
    rows = []
    for result in grid_result:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        child = find_run(uri, experiment_id, TRIAL_ID_TAG, f"{spec.name}-{trial_id}")
        if result.error is not None:
            status = "failed"
        elif m.get("status") == "finished":
            status = "finished"
        elif not interrupted:
            status = "stopped"  # terminated by the scheduler before its last epoch
        else:
            status = "unfinished"
        if child is not None and child.info.status == "RUNNING" and status in ("failed", "stopped"):
            logger = RunLogger(uri, child.info.run_id)
            if status == "stopped":
                logger.set_tags({"qat.stopped_early": "true"})
            logger.finish("FINISHED" if status == "stopped" else "FAILED")
        rows.append({
            "trial": trial_id, "point": point_label({k: result.config.get(k) for k in keys if k in result.config}),
            "status": status, "fp32_acc": m.get("fp32_acc", math.nan), "ptq_acc": m.get("ptq_acc", math.nan),
            "val_acc": m.get("val_acc", math.nan), "test_acc": m.get("test_acc", math.nan),
            "export_dir": m.get("export_dir", ""), "run_id": child.info.run_id if child is not None else "",
        })
    sign = -1 if spec.mode == "max" else 1

    def key(r: dict[str, Any]) -> tuple:
        value = r[spec.metric]
        return (r["status"] != "finished", math.isnan(value), sign * (0 if math.isnan(value) else value))

    return sorted(rows, key=key)


def format_table(outcome: SweepOutcome, metric: str) -> str:
    """The end-of-sweep table, sorted by ``metric`` (best first)."""
    header = ("trial", "point", "status", "FP32", "PTQ", "val", "QAT", "Δ")
    lines = []
    for r in outcome.rows:
        delta = r["test_acc"] - r["fp32_acc"]
        lines.append((r["trial"], r["point"] or "-", r["status"], f"{r['fp32_acc']:.2f}", f"{r['ptq_acc']:.2f}",
                      f"{r['val_acc']:.2f}", f"{r['test_acc']:.2f}", f"{delta:+.2f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
    out = [f"sweep {outcome.name}: {len(outcome.rows)} trial(s), sorted by {metric}", fmt(header),
           fmt(tuple("-" * w for w in widths))]
    out += [fmt(row) for row in lines]
    return "\n".join(out)
