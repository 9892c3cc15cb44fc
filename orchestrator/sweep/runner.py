"""Running a planned sweep on Ray Tune: the parent run, the Tuner (or its restore), the end.

Layout under the output root: ``sweeps/<name>/`` is Tune's experiment directory (its state
makes ``sweep.resume=true`` possible), ``sweeps/<name>/trials/<trial id>/`` holds each
trial's export and checkpoints, ``sweeps/<name>/train`` multi-worker trials' Ray Train state.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..tracking.links import save_sweep_view
from ..tracking.mlflow_runs import (FAILURE_REASON_TAG, KIND_TAG, OUTCOME_TAG, SWEEP_ID_TAG, RunLogger,
                                    ensure_experiment, find_or_create_run)
from ..tracking.run_content import trial_params
from ..tracking.source import source_tags
from ..train.launcher import prepare
from . import lifecycle
from .lock import DRIVER_TAG, driver_record
from .plan import SweepPlan
from .resources import in_actor, max_concurrent, trial_resources
from .trial import SweepContext


@dataclass
class SweepRun:
    """What the console needs once the sweep has started."""

    plan: SweepPlan
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    dashboard: str | None
    concurrency: int
    interrupted: bool = False


def trial_dirname(trial) -> str:
    return trial.trial_id


def _search_alg(plan: SweepPlan, concurrency: int):
    """Tune's own search algorithms: its variant generator (grid and random draws; it takes the
    concurrency limit itself) or Optuna (TPE), which Tune wraps in a ConcurrencyLimiter."""
    from ray.tune.search import BasicVariantGenerator

    spec = plan.spec
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.seed)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=spec.seed)


def _scheduler(plan: SweepPlan):
    spec = plan.spec
    if spec.scheduler == "none":
        return None
    from ray.tune.schedulers import AsyncHyperBandScheduler

    # One report per epoch plus the final one: a trial of E epochs reports E + 1 times.
    return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=plan.max_epochs() + 1,
                                   grace_period=spec.grace_period, reduction_factor=spec.reduction_factor,
                                   brackets=1 if spec.scheduler == "asha" else 3)


def sweep_id(plan: SweepPlan) -> str:
    """The parent run's identity: the sweep's name and where its state lives."""
    return f"{plan.spec.name}-{hashlib.sha256(str(plan.sweep_dir).encode()).hexdigest()[:12]}"


def open_parent(plan: SweepPlan, uri: str, experiment: str) -> tuple[str, dict[str, str]]:
    """The sweep's MLflow parent run (found again on resume, its stale labels removed) and the
    source tags its children copy."""
    spec = plan.spec
    tags = source_tags()
    parent_id, created = find_or_create_run(uri, experiment, SWEEP_ID_TAG, sweep_id(plan), f"sweep {spec.name}",
                                            {KIND_TAG: "sweep", "qat.sweep_name": spec.name,
                                             "qat.sweep_dir": str(plan.sweep_dir), **tags})
    parent = RunLogger(uri, parent_id)
    parent.set_tags({DRIVER_TAG: driver_record()})
    if created:
        params = {f"space.{d.key.lstrip('+~')}": d.describe() for d in plan.space.dims}
        params.update({f"sweep.{k}": str(getattr(spec, k))
                       for k in ("search", "num_samples", "scheduler", "metric", "mode", "tie_on_samples")})
        fixed = {k: v for k, v in trial_params(plan.base).items() if f"space.{k}" not in params}
        parent.log_params({**fixed, **params})
    else:
        parent.delete_tags([OUTCOME_TAG, FAILURE_REASON_TAG, "best_run_id"])
    save_sweep_view(uri, ensure_experiment(uri, experiment), spec.name, [d.key.lstrip("+~") for d in plan.space.dims],
                    spec.metric[len("val_"):])
    return parent_id, tags


def start(plan: SweepPlan, log=print) -> tuple[SweepRun, object]:
    """Prepare the base trial (FP32 baseline), start or join Ray, open the parent run; returns the
    run's description and the Tuner to fit."""
    from ray import tune

    from ..train.ray_launcher import check_fits, check_local_capacity, dashboard_url, ensure_ray

    spec = plan.spec
    base = copy.deepcopy(plan.base)
    base.tracking.uri = plan.tracking_uri
    base = prepare(base, log=log)  # trains/caches the FP32 baseline once, before any trial starts
    plan.base = base
    check_local_capacity(base.trainer, extra_cpus=0.0 if in_actor(base) else spec.trial_driver_cpus)
    uri, experiment = base.tracking.uri, base.tracking.experiment
    # MLflow's store setup (a new SQLite database migrates its schema, ~2 s) runs while Ray starts.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-parent") as pool:
        parent = pool.submit(lambda: (ensure_experiment(uri, experiment), *open_parent(plan, uri, experiment)))
        started_locally = ensure_ray(base.trainer.ray_address, log_to_driver=spec.verbose)
        lifecycle.install()  # again: Ray's core worker installs its own SIGTERM handler (it aborts)
        experiment_id, parent_id, tags = parent.result()
    import ray

    try:
        check_fits(base.trainer, started_locally, extra_cpus=0.0 if in_actor(base) else spec.trial_driver_cpus)
        ctx = SweepContext(spec.name, str(plan.sweep_dir), uri, experiment, parent_id,
                           numbered=spec.num_samples > 1, tags=tags)
        from .trial import sweep_trial

        trainable = tune.with_resources(
            tune.with_parameters(sweep_trial, composer=plan.composer, space=plan.space, ctx=ctx.to_dict()),
            trial_resources(base, spec))
        concurrency = max_concurrent(base, spec, ray.cluster_resources())
        run = SweepRun(plan, uri, experiment_id, parent_id, dashboard_url(), concurrency)
        if spec.resume:  # the RunConfig (progress callback included) comes back from Tune's state
            tuner = tune.Tuner.restore(str(plan.sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
            return run, tuner
        return run, _new_tuner(plan, trainable, ctx, concurrency)
    except BaseException as exc:  # refused (resources) or interrupted before Tune ran: close the parent
        from ..console import first_line

        interrupted = isinstance(exc, KeyboardInterrupt)
        parent_run = RunLogger(uri, parent_id)
        parent_run.end("interrupted" if interrupted else "failed",
                       "interrupted before any trial ran" if interrupted else first_line(exc))
        raise


def _new_tuner(plan: SweepPlan, trainable, ctx: SweepContext, concurrency: int):
    from ray import tune

    from .progress import SweepProgress

    spec, base = plan.spec, plan.base
    progress = SweepProgress(plan.composer, plan.space, ctx, spec.metric, spec.mode, plan.total, spec.scheduler)
    return tune.Tuner(
        trainable,
        param_space=plan.space.param_space(spec.search),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    search_alg=_search_alg(plan, concurrency), scheduler=_scheduler(plan),
                                    max_concurrent_trials=concurrency if spec.search == "optuna" else None,
                                    trial_dirname_creator=trial_dirname,
                                    # a trial's actor runs the next trial: its imports and data are warm
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(plan.sweep_dir.parent), callbacks=[progress],
                                  verbose=0, failure_config=tune.FailureConfig(
                                      max_failures=base.trainer.max_failures if in_actor(base) else 0)),
    )


def fit(run: SweepRun, tuner) -> None:
    """``tuner.fit()`` with Ctrl-C/SIGTERM turned into Tune's graceful stop (``lifecycle``)."""
    lifecycle.STATE.in_fit = True
    try:
        tuner.fit()  # the results are read from MLflow (finish.py), where qat-compare reads them
    except KeyboardInterrupt:
        pass
    finally:
        lifecycle.STATE.in_fit = False
    run.interrupted = lifecycle.STATE.stopping


def mark_interrupted(run: SweepRun) -> int:
    """Every child run still RUNNING and the parent: KILLED, ``qat.outcome=interrupted``.
    Returns how many trials were cut short."""
    return close_unfinished(run, "interrupted", f"the sweep was interrupted ({lifecycle.STATE.signal_name})")


def close_unfinished(run: SweepRun, outcome: str, reason: str) -> int:
    """Every child run still RUNNING and the parent end with ``outcome`` (``interrupted``: KILLED,
    ``failed``: FAILED) and ``qat.failure_reason``. Returns how many trials were cut short."""
    from ..tracking.mlflow_runs import PARENT_TAG, client, retrying

    c = client(run.tracking_uri)
    children = retrying(lambda: c.search_runs([run.experiment_id],
                                              filter_string=f"tags.`{PARENT_TAG}` = '{run.parent_run_id}' "
                                                            "and attributes.status = 'RUNNING'"))
    for child in children:
        RunLogger(run.tracking_uri, child.info.run_id).end(outcome, reason)
    RunLogger(run.tracking_uri, run.parent_run_id).end(outcome, reason)
    return len(children)


def shutdown_ray() -> None:
    """Stop the local Ray this process started (its error lines then come before ours, not after)."""
    import ray

    if ray.is_initialized():
        sys.stdout.flush()
        ray.shutdown()
