"""The sweep's console and its children's MLflow labels, driven by Tune's ``Callback`` hooks.

One line per trial event, in the driver (trials print nothing to the console):

    [  14s] started   w4a4 lr=1e-3 ep=3 RL  (3/8)
    [  21s]           w4a4 lr=1e-3 ep=3 RL  epoch 1/3  val_acc 97.77  1.2s
    [  29s] finished  w4a4 lr=1e-3 ep=3 RL  val_acc 98.88  test_acc 99.72 | 4/8 done, 2 running | best val_acc 98.88

Tune's own reporters print multi-line tables on a timer; there is no one-line-per-event mode,
so this is written on Tune's ``Callback`` API instead. The callback also labels what only the
driver can know: a trial the scheduler stopped (``qat.outcome=stopped_by_scheduler``) and a
trial whose actor died (``failed``). The object is pickled with Tune's state (plain values).
"""

from __future__ import annotations

import math
import time
from typing import Any

import psutil
from ray.tune import Callback

from ..console import paint
from ..tracking.mlflow_runs import TRIAL_ID_TAG, RunLogger, ensure_experiment, find_run
from ..tracking.mlflow_runs import trial_outcome
from . import lifecycle
from .compose import Composer
from .space import SearchSpace
from .trial import SweepContext, build_trial_config

def elapsed() -> str:
    """``[  14s]``: seconds since this command's process started (the callback runs in the driver;
    a resumed sweep's callback comes back from Tune's state and still reads its own command's clock)."""
    return f"[{time.time() - psutil.Process().create_time():5.0f}s]"


class SweepProgress(Callback):
    def __init__(self, composer: Composer, space: SearchSpace, ctx: SweepContext, metric: str, mode: str,
                 total: int, scheduler: str) -> None:
        self.composer, self.space, self.ctx = composer, space, ctx
        self.metric, self.mode, self.total, self.scheduler = metric, mode, total, scheduler
        self.names: dict[str, str] = {}
        self.epochs: dict[str, int] = {}
        self.best: tuple[float, str] | None = None
        self.started = 0

    # -- helpers ---------------------------------------------------------------------------
    def _name(self, trial) -> str:
        if trial.trial_id not in self.names:
            try:
                cfg = build_trial_config(self.composer, self.space, dict(trial.config), self.ctx, trial.trial_id)
                self.names[trial.trial_id] = cfg.tracking.run_name
                self.epochs[trial.trial_id] = cfg.qat.epochs
            except Exception:  # the trial itself reports a config it cannot compose
                self.names[trial.trial_id] = trial.trial_id
        return self.names[trial.trial_id]

    def _line(self, event: str, trial, text: str = "", status: str = "") -> None:
        event = f"{event:<9}"
        if event.startswith(("FAILED", "DIVERGED")):
            event = paint(event, "red")
        elif event.startswith("finished"):
            event = paint(event, "green")
        elif event.startswith("stopped"):
            event = paint(event, "yellow")
        parts = [f"{elapsed()} {event} {self._name(trial)}"]
        if text:
            parts.append(f"  {text}")
        if status:
            parts.append(f" | {status}")
        print("".join(parts), flush=True)

    def _status(self, trials: list, ended=None, ended_as: str = "TERMINATED") -> str:
        statuses = [ended_as if t is ended else t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in statuses)
        running = statuses.count("RUNNING")
        best = f"best {self.metric} {self.best[0]:.2f} ({self.best[1]})" if self.best else "no result yet"
        return f"{done}/{max(self.total, len(trials))} done, {running} running | {best}"

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best[0] if self.mode == "max" else value < self.best[0]

    def _child(self, trial) -> RunLogger | None:
        experiment_id = ensure_experiment(self.ctx.tracking_uri, self.ctx.experiment)
        run = find_run(self.ctx.tracking_uri, experiment_id, TRIAL_ID_TAG, f"{self.ctx.sweep_name}-{trial.trial_id}")
        return RunLogger(self.ctx.tracking_uri, run.info.run_id) if run is not None else None

    # -- Tune hooks ------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.started += 1
        self._line("started", trial, f"({self.started}/{max(self.total, len(trials))})")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        if "status" in result:
            return  # the trial's final report: on_trial_complete prints it
        value, epoch = result.get(self.metric), result.get("epoch")
        if epoch is None:
            return
        total = self.epochs.get(trial.trial_id, "?")
        text = f"epoch {int(epoch) + 1}/{total}  {self.metric} {value:.2f}"
        if isinstance(result.get("epoch_time_s"), (int, float)):
            text += f"  {result['epoch_time_s']:.1f}s"
        print(f"{elapsed()} {'':9} {self._name(trial)}  {text}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        status, value = last.get("status"), last.get(self.metric)
        if status in ("finished", "diverged"):
            self._ensure_closed(trial, status)
        if status == "finished":
            if isinstance(value, (int, float)) and not math.isnan(value) and self._better(value):
                self.best = (float(value), self._name(trial))
            test = "test_" + self.metric[len("val_"):]
            text = f"{self.metric} {value:.2f}  {test} {last.get(test, math.nan):.2f}"
            self._line("finished", trial, text, self._status(trials, ended=trial))
        elif status == "diverged":
            reason = str(last.get("error") or "training diverged").replace("training diverged: ", "")
            self._line("DIVERGED", trial, reason[:160], self._status(trials, ended=trial))
        elif lifecycle.STATE.stopping:
            return  # interrupted: the driver marks it once Tune has stopped
        else:
            epoch = last.get("epoch")
            at = f" after epoch {int(epoch) + 1}" if epoch is not None else ""
            value_text = f": {self.metric} {value:.2f}" if isinstance(value, (int, float)) else ""
            self._line("stopped", trial, f"by {self.scheduler}{at}{value_text}", self._status(trials, ended=trial))
            child = self._child(trial)
            if child is not None:
                child.end("stopped_by_scheduler", tags={"qat.stopped_at_epoch": str(epoch)})

    def _ensure_closed(self, trial, status: str) -> None:
        """A trial closes its run before its final report; one stopped by Tune right at that
        report (a multi-worker trial) may not have: close it as its report says."""
        child = self._child(trial)
        if child is not None and child.status() == "RUNNING":
            child.end(trial_outcome(status))

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._line("retrying", trial, f"after a failure: {_error_line(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if lifecycle.STATE.stopping:
            return
        reason = _error_line(trial)
        self._line("FAILED", trial, reason, self._status(trials, ended=trial, ended_as="ERROR"))
        child = self._child(trial)
        if child is not None and child.status() == "RUNNING":
            child.end("failed", reason)


def _error_line(trial) -> str:
    """The exception that ended a trial, on one line (its traceback is in the trial's error.txt)."""
    try:
        error = trial.get_pickled_error()
    except Exception:
        error = None
    cause = getattr(error, "cause", None) or error
    if cause is not None:
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]
    return f"see {trial.error_file or 'the trial log'}"
