"""Live sweep progress in the driver: one line per epoch result and per finished trial."""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback

from .trial import point_label


class SweepProgress(Callback):
    """Prints ``[sweep] trial epoch e: val_acc | 2/8 done, 1 running | best ...`` lines."""

    def __init__(self, sweep_name: str, metric: str, mode: str, space_keys: list[str], total: int) -> None:
        self.sweep_name = sweep_name
        self.total = total  # Tune creates trials lazily: its list grows while the sweep runs
        self.metric = metric
        self.mode = mode
        self.keys = space_keys
        self.best: tuple[float, str] | None = None
        self.start = time.time()

    def setup(self, **info: Any) -> None:  # also called when a sweep is resumed
        self.start = time.time()

    def _point(self, trial) -> str:
        return point_label({k: trial.config[k] for k in self.keys if k in trial.config})

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best[0] if self.mode == "max" else value < self.best[0]

    def _status(self, trials: list, ended=None, ended_as: str = "TERMINATED") -> str:
        """Counts from Tune's trial list; ``ended`` is a trial Tune has not yet marked ``ended_as``."""
        statuses = [ended_as if t is ended else t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in statuses)
        running = sum(s == "RUNNING" for s in statuses)
        errored = statuses.count("ERROR")
        best = f"best {self.metric} {self.best[0]:.2f} ({self.best[1]})" if self.best else "no result yet"
        return (f"{done}/{max(self.total, len(trials))} done, {running} running, {errored} errored | {best} | "
                f"{time.time() - self.start:.0f}s")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and not math.isnan(value) and self._better(value):
            self.best = (float(value), self._point(trial))
        if "test_acc" in result:
            return  # the final report; on_trial_complete prints the line
        epoch = result.get("epoch")
        if value is not None and epoch is not None:
            print(f"[sweep {self.sweep_name}] {trial.trial_id} {self._point(trial)} epoch {int(epoch) + 1}: "
                  f"{self.metric} {value:.2f} | {self._status(trials)}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        qat = last.get("test_acc")
        text = f"test_acc {qat:.2f}" if isinstance(qat, (int, float)) else "stopped early"
        print(f"[sweep {self.sweep_name}] {trial.trial_id} {self._point(trial)} finished: {text} | "
              f"{self._status(trials, ended=trial)}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        print(f"[sweep {self.sweep_name}] {trial.trial_id} {self._point(trial)} FAILED | "
              f"{self._status(trials, ended=trial, ended_as='ERROR')}", flush=True)
