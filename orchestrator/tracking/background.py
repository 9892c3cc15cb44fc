"""MLflow writes off the training path: a ``RunLogger`` driven by one background thread.

Rank 0 of a trial logs parameters, tags, per-epoch metrics and artifacts. Done inline, the first
write alone costs ~2 s before the first training step (importing MLflow, opening the store).
``BackgroundRunLogger`` returns at once and performs every call, in call order, on one thread.
A failed write is not lost: the next call (or ``close``) raises it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any


class BackgroundRunLogger:
    """The methods of ``mlflow_runs.RunLogger`` for run ``run_id``, queued on a worker thread.

    ``logged_steps``, ``flush`` and ``close`` wait for every write queued before them and raise
    the first error. Metric timestamps are taken at call time.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        from .mlflow_runs import RunLogger

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-writer")
        self._logger: Future = self._pool.submit(RunLogger, uri, run_id)
        self._pending: list[Future] = [self._logger]

    def _submit(self, method: str, *args: Any) -> Future:
        self._raise_failed()
        future = self._pool.submit(lambda: getattr(self._logger.result(), method)(*args))
        self._pending.append(future)
        return future

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
                for future in self._pending:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)
