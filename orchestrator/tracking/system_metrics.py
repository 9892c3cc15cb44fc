"""System metrics (CPU, memory, disk, network; GPU with pynvml) into a run, by MLflow's own monitor.

``mlflow.system_metrics``' ``SystemMetricsMonitor`` samples on a thread and logs
``system/...`` metrics. The sampling interval defaults to 2 s here (a trial may last seconds);
MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it.
"""

from __future__ import annotations

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
