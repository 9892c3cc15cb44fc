"""MLflow runs for trials and sweeps, through ``MlflowClient`` (no global active run).

- One run per trial, found again by its ``qat.trial_id`` tag, so a restarted trial logs into
  the run it started instead of creating a duplicate; a child of the sweep's parent run when
  ``parent_run_id`` is given.
- SQLite backends get an absolute ``artifact_location`` beside the database (Tune changes
  working directories), and writes are retried while the database is locked by another writer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TRIAL_ID_TAG = "qat.trial_id"
SWEEP_ID_TAG = "qat.sweep_id"
KIND_TAG = "qat.kind"  # "trial", "sweep" or "analysis" (qat-analyze)
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MAX_PARAM_LENGTH = 6000
OUTCOME_TAG = "qat.outcome"  # finished | stopped_by_scheduler | diverged | failed | interrupted
FAILURE_REASON_TAG = "qat.failure_reason"  # why a run ended FAILED or KILLED, one line
# a run's end: its outcome decides its MLflow status
OUTCOME_STATUS = {"finished": "FINISHED", "stopped_by_scheduler": "FINISHED", "diverged": "FAILED",
                  "failed": "FAILED", "interrupted": "KILLED"}


def trial_outcome(status: str | None) -> str:
    """The outcome of a trial whose final report says ``status`` (``finished``, ``diverged``, ...)."""
    return status if status in ("finished", "diverged") else "failed"


def default_tracking_uri(root: str | Path) -> str:
    """``sqlite:////abs/root/mlflow.db``: absolute, so it works from any working directory."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def retrying(call: Callable[[], T], attempts: int = 30) -> T:
    """Run ``call``, retrying with jittered backoff while SQLite reports the database locked."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:  # MlflowException / OperationalError, depending on the layer
            transient = "locked" in str(exc).lower() or "busy" in str(exc).lower()
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts beside a SQLite database)."""
    c = client(uri)
    exp = retrying(lambda: c.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_sqlite(uri):
        location = (sqlite_path(uri).parent / "mlartifacts").resolve().as_uri()
    # The MLflow UI opens an experiment of this kind in its model-training view (runs table),
    # not the GenAI view (traces).
    tags = {EXPERIMENT_KIND_TAG: "custom_model_development"}
    try:
        return retrying(lambda: c.create_experiment(name, artifact_location=location, tags=tags))
    except Exception:  # another process created it first
        exp = retrying(lambda: c.get_experiment_by_name(name))
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, experiment_id: str, tag: str, value: str) -> Any | None:
    """The most recent run of the experiment whose tag ``tag`` equals ``value``, or None."""
    c = client(uri)
    runs = retrying(lambda: c.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                                          order_by=["attributes.start_time DESC"], max_results=1))
    return runs[0] if runs else None


def find_or_create_run(uri: str, experiment: str, tag: str, value: str, run_name: str,
                       tags: dict[str, str], parent_run_id: str | None = None) -> tuple[str, bool]:
    """``(run_id, created)``: the run tagged ``tag=value``, or a new RUNNING one with ``tags``."""
    experiment_id = ensure_experiment(uri, experiment)
    existing = find_run(uri, experiment_id, tag, value)
    c = client(uri)
    if existing is not None:
        if existing.info.status != "RUNNING":
            retrying(lambda: c.update_run(existing.info.run_id, status="RUNNING"))
        return existing.info.run_id, False
    all_tags = {**tags, tag: value}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = retrying(lambda: c.create_run(experiment_id, tags=all_tags, run_name=run_name))
    return run.info.run_id, True


def create_run(uri: str, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
    """The id of a new RUNNING run of ``experiment`` (created if missing) with ``tags``."""
    experiment_id = ensure_experiment(uri, experiment)
    c = client(uri)
    return retrying(lambda: c.create_run(experiment_id, tags=tags, run_name=run_name)).info.run_id


class RunLogger:
    """Writes to one existing run; used by rank 0 (and the driver for status)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client = client(uri)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            retrying(lambda chunk=items[i:i + 100]: self._client.log_batch(self.run_id, params=chunk))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        retrying(lambda: self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        retrying(lambda: self._client.log_batch(self.run_id, metrics=batch))

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in retrying(lambda: self._client.get_metric_history(self.run_id, key))}

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        retrying(lambda: self._client.log_artifacts(self.run_id, str(local_dir), artifact_path))

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        retrying(lambda: self._client.log_dict(self.run_id, obj, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        retrying(lambda: self._client.log_text(self.run_id, text, artifact_file))

    def log_table(self, columns: dict[str, list[Any]], artifact_file: str) -> None:
        """``columns`` (``{name: values}``, equal lengths) as a JSON table the MLflow UI shows."""
        retrying(lambda: self._client.log_table(self.run_id, columns, artifact_file))

    def delete_tags(self, keys: list[str]) -> None:
        """Remove the tags ``keys`` that the run has (stale labels of an earlier attempt)."""
        run = retrying(lambda: self._client.get_run(self.run_id))
        for key in keys:
            if key in run.data.tags:
                retrying(lambda key=key: self._client.delete_tag(self.run_id, key))

    def tags(self) -> dict[str, str]:
        return dict(retrying(lambda: self._client.get_run(self.run_id)).data.tags)

    def status(self) -> str:
        return retrying(lambda: self._client.get_run(self.run_id)).info.status

    def end(self, outcome: str, reason: str | None = None, tags: dict[str, str] | None = None,
            best_effort: bool = False) -> None:
        """Close the run, the one way runs are closed: ``qat.outcome`` (``OUTCOME_STATUS``'s keys),
        ``qat.failure_reason`` (one line) unless it finished, ``tags``, then the MLflow status the
        outcome implies. ``best_effort``: on a failing path a broken tracking store must not hide
        the error being reported, so a failure to close is swallowed."""
        status = OUTCOME_STATUS[outcome]
        labels = {OUTCOME_TAG: outcome, **(tags or {})}
        if reason and status != "FINISHED":
            labels[FAILURE_REASON_TAG] = reason.strip().splitlines()[0][:5000] if reason.strip() else reason
        try:
            self.set_tags(labels)
            retrying(lambda: self._client.set_terminated(self.run_id, status=status))
        except Exception:
            if not best_effort:
                raise
