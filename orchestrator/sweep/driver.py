"""A sweep from start to end, as the Hydra sweeper runs it (``qat-sweep``, ``qat-train -m``).

    plan (validate everything, ~1 s, nothing written) -> start (FP32 baseline, Ray, parent run)
    -> fit (one line per trial event) -> finish (table, plot, best model registered)

Configuration errors exit 2 with one ``error:`` line; an interrupted sweep marks its runs
KILLED, prints the command that resumes it and exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import errno
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..console import fail, fail_unexpected, first_line, quiet_libraries
from ..train.config import TrialConfigError
from . import lifecycle


def _config_errors() -> tuple[type[Exception], ...]:
    from ..quant import QuantError
    from ..zoo.registry import RegistryError

    return TrialConfigError, QuantError, RegistryError


def run_from_hydra(config_loader, master_config, overrides: list[str]) -> None:
    started = time.time()
    from .plan import plan_sweep

    errors = _config_errors()
    try:
        plan = plan_sweep(config_loader, master_config, overrides)
    except errors as exc:
        fail(exc)
    spec = plan.spec
    from .lock import SweepLock, check_tracked_driver
    from .plan import check_existing
    from .runner import sweep_id

    lock = SweepLock(plan.root, spec.name)
    try:
        lock.acquire()
        check_existing(plan)  # under the lock: no other driver of this name can start or end meanwhile
        check_tracked_driver(plan.tracking_uri, plan.base.tracking.experiment, sweep_id(plan), spec.name)
    except errors as exc:
        lock.release()
        fail(exc)
    try:
        _drive(plan, started, errors, lock)
    finally:
        lock.release()


def _drive(plan, started: float, errors, lock) -> None:
    spec = plan.spec
    quiet_libraries(spec.verbose)
    lifecycle.install()
    if lock.took_over:
        print(f"sweep {spec.name}: took over the lock of {lock.took_over}, which is no longer running", flush=True)
    dims = " x ".join(f"{d.key} ({len(d.values) if not d.is_interval else d.describe()})" for d in plan.space.dims)
    print(f"sweep {spec.name}: {plan.total} trial(s), {spec.search} search over {dims or 'no swept key'}"
          f"{'' if spec.scheduler == 'none' else f', {spec.scheduler} early stopping'}"
          f"{' (resuming)' if spec.resume else ''}", flush=True)
    from .runner import close_unfinished, mark_interrupted, shutdown_ray

    open_run = Unrecorded()
    try:
        _sweep(plan, started, errors, open_run)
    except KeyboardInterrupt:  # a signal before or after Tune's run, or a second one
        if open_run.run is not None:
            mark_interrupted(open_run.run)
        from .plan import sweep_state_exists

        again = (f"resume with: {lifecycle.resume_command(spec.name)}" if sweep_state_exists(plan.sweep_dir)
                 else "nothing ran yet: run the same command again")
        fail(f"sweep {spec.name} interrupted ({lifecycle.STATE.signal_name}); {again}",
             status=lifecycle.STATE.exit_status)
    except Exception as exc:  # a full disk, a dead tracking server, Tune's own state unreadable, ...
        if disk_full(plan.root):  # Tune then fails reading its own truncated state, in its own words
            exc = OSError(errno.ENOSPC, f"No space left on device under paths.root={str(plan.root)!r} "
                                        f"(then {first_line(exc)})")
        run = open_run.run
        if run is not None:
            try:
                close_unfinished(run, "failed", f"the sweep driver failed: {first_line(exc)}")
            except Exception:  # the tracking store itself may be what failed
                pass
        try:
            shutdown_ray()
        except Exception:
            pass
        fail_unexpected(exc, f"sweep {spec.name}")


def disk_full(root: Path) -> bool:
    try:
        return shutil.disk_usage(root).free < 1024 * 1024
    except OSError:
        return False


@dataclass
class Unrecorded:
    """The started sweep until its end is recorded in MLflow (for the error paths of ``_drive``)."""

    run: object = None


def _sweep(plan, started: float, errors, open_run: Unrecorded) -> None:
    """Start, fit and finish the planned sweep; on success print its table and links."""
    from .runner import fit, mark_interrupted, shutdown_ray, start

    spec = plan.spec
    try:
        run, tuner = start(plan)
    except errors as exc:
        fail(exc)
    open_run.run = run
    _links(run, f"started in {time.time() - started:.0f}s; {run.concurrency} trial(s) at a time")
    from ..tracking.system_metrics import system_metrics
    with system_metrics(run.tracking_uri, run.parent_run_id):
        fit(run, tuner)
    if run.interrupted:
        cut = mark_interrupted(run)
        shutdown_ray()
        fail(f"sweep {spec.name} interrupted ({lifecycle.STATE.signal_name}): {cut} trial(s) cut short, marked "
             f"KILLED in MLflow with the parent run; finished trials are kept; resume with: "
             f"{lifecycle.resume_command(spec.name)}", status=lifecycle.STATE.exit_status)
    from .finish import best_line, finish

    result = finish(run)
    open_run.run = None  # recorded: nothing after this point may relabel it
    shutdown_ray()
    print(f"\nsweep {spec.name}: {len(result.rows)} trial(s) in {time.time() - started:.0f}s")
    print(result.table)
    print(best_line(result, spec.metric))
    if result.registered:
        name, version = result.registered
        print(f"registered: models:/{name}/{version} (MLflow Model Registry: the best trial's ONNX model + encodings)")
    _links(run, f"compare: qat-compare --sweep {spec.name} --tracking-uri {run.tracking_uri}")
    sys.stdout.flush()
    if result.best is None:
        fail(f"sweep {spec.name}: no trial finished (each trial's error is in "
             f"{plan.sweep_dir}/<trial>/error.txt)", status=1)


def _links(run, first: str) -> None:
    from ..tracking.links import runs_url, ui_command

    lines = [first]
    if run.dashboard:
        lines.append(f"Ray dashboard: {run.dashboard}")
    command = ui_command(run.tracking_uri)
    url = runs_url(run.tracking_uri, run.experiment_id, run.plan.spec.name)
    lines.append(f"MLflow: {command + '  then open ' if command else ''}{url}")
    print("\n".join(lines), flush=True)
