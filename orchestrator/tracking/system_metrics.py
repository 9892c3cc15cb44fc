"""System metrics (CPU, memory, disk, network; GPU with pynvml) into a run, by MLflow's own monitor.

``mlflow.system_metrics``' ``SystemMetricsMonitor`` samples on a thread every 2 s here (a warm
sweep trial may last a few seconds; MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
overrides it) and logs ``system/...`` metrics, averaged per interval. Its thread drops the
samples of an unfinished interval when it stops, so the last window (or the only one, for a
trial shorter than an interval) is sampled and logged once more on exit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

SAMPLING_INTERVAL_S = 2.0


@contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float = SAMPLING_INTERVAL_S) -> Iterator[None]:
    """Log system metrics into ``run_id`` while the block runs (continuing a resumed run's steps)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:  # telemetry only: never fail a trial over it
            logging.getLogger(__name__).warning("system metrics of run %s not logged: %s", run_id, exc)
