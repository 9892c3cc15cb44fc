"""MLflow writes off the training path: a ``RunLogger`` driven by one background thread.

Rank 0 of a trial logs parameters, tags, per-epoch metrics and artifacts. Done inline, the first
write alone costs ~2 s before the first training step (importing MLflow, opening the store).
``BackgroundRunLogger`` returns at once and performs every call, in call order, on one thread.

An MLflow outage never stops training: a write that fails for a transient reason (connection
refused or reset, a timeout, HTTP 5xx, a locked database) is retried on the thread with backoff
until the server answers again or ``outage_limit_s`` has passed; the writes queued behind it wait
their turn, so everything lands once, in order. Before a metric batch is sent again, the points
the server already holds (a request that landed although its answer was lost) are left out.
A write that fails for good (no such run, a bad value, no permission) is not lost: the next call
(or ``flush``/``close``) raises it.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# MLflow error codes that retrying cannot fix.
PERMANENT_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                   "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST", "INVALID_STATE", "ENDPOINT_NOT_FOUND"}
OUTAGE_LIMIT_S = 3600.0


def transient(exc: BaseException) -> bool:
    """True for failures a later attempt may not meet: the server or the network, not the request."""
    code = getattr(exc, "error_code", None)
    if code in PERMANENT_CODES:
        return False
    text = f"{type(exc).__name__}: {exc}".lower()
    markers = ("connection", "max retries", "timed out", "timeout", "temporarily", "unavailable", "locked", "busy",
               "bad gateway", "status code 5", "internal_error", "reset by peer", "broken pipe", "refused")
    return code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE") or any(m in text for m in markers)


class MlflowOutage(RuntimeError):
    """MLflow stayed unreachable for longer than the logger waits."""


class BackgroundRunLogger:
    """The methods of ``mlflow_runs.RunLogger`` for run ``run_id``, queued on a worker thread.

    ``logged_steps``, ``flush`` and ``close`` wait for every write queued before them and raise
    the first error that retrying could not fix. Metric timestamps are taken at call time.
    ``outage_limit_s``: how long one write is retried through an outage before it fails.
    """

    def __init__(self, uri: str, run_id: str, outage_limit_s: float = OUTAGE_LIMIT_S) -> None:
        from .mlflow_runs import RunLogger

        self.outage_limit_s = outage_limit_s
        self.outages = 0  # writes that met a transient failure and were retried
        self._giving_up = False  # set by close(raise_errors=False): no more waiting out an outage
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-writer")
        self._logger: Future = self._pool.submit(RunLogger, uri, run_id)
        self._pending: list[Future] = [self._logger]

    def _submit(self, method: str, *args: Any) -> Future:
        self._raise_failed()
        future = self._pool.submit(self._perform, method, args)
        self._pending.append(future)
        return future

    def _perform(self, method: str, args: tuple) -> Any:
        """Run one write on the thread, retrying it through transient failures."""
        logger = self._logger.result()
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                if method == "log_metrics" and attempt > 0:
                    args = self._still_missing(logger, *args)
                    if not args[0]:
                        return None
                if method == "__call__":
                    return args[0](logger)
                return getattr(logger, method)(*args)
            except Exception as exc:
                if not transient(exc):
                    raise
                waited = time.monotonic() - started
                if waited > self.outage_limit_s or self._giving_up:
                    raise MlflowOutage(f"MLflow unreachable for {waited:.0f} s ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
                if attempt == 0:
                    self.outages += 1
                attempt += 1
                time.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)) * (0.5 + random.random()))

    @staticmethod
    def _still_missing(logger, metrics: dict[str, float], step: int, timestamp_ms: int) -> tuple:
        """The metrics of a batch that failed in transit and are not in MLflow at ``step`` yet."""
        missing = {k: v for k, v in metrics.items() if step not in logger.logged_steps(k)}
        return missing, step, timestamp_ms

    def _raise_failed(self) -> None:
        """Raise the error of a finished write, if any; forget the writes that succeeded."""
        for future in self._pending:
            if future.done():
                future.result()
        self._pending = [f for f in self._pending if not f.done()]

    def log_params(self, params: dict[str, str]) -> None:
        self._submit("log_params", dict(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit("set_tags", dict(tags))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._submit("log_metrics", dict(metrics), step, int(time.time() * 1000))

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        self._submit("log_dict", obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit("log_text", text, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self._submit("log_artifacts", local_dir, artifact_path)

    def run(self, fn) -> None:
        """Queue ``fn(run_logger)``: several calls that belong together, in order with the rest. It
        is retried whole through an outage, so it must be idempotent (check before writing)."""
        self._submit("__call__", fn)

    def logged_steps(self, key: str) -> set[int]:
        """The steps of metric ``key`` in MLflow, after every write queued before this call."""
        self.flush()
        return self._submit("logged_steps", key).result()

    def flush(self) -> None:
        """Wait for every queued write; raise the first that failed."""
        for future in self._pending:
            future.result()
        self._pending = []

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every queued write; raise the first that failed (unless ``raise_errors`` is
        False: on a path that is already failing, the writes still finish, quietly)."""
        try:
            if raise_errors:
                self.flush()
            else:
                self._giving_up = True
                for future in self._pending:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)
