"""Where to look at a sweep: the ``mlflow ui`` command for a SQLite store and the runs-table URL.

The URL opens the experiment's runs table in the UI's model-training view
(``workflowType=machine_learning``; the experiment also carries
``mlflow.experimentKind=custom_model_development``), filtered to the sweep's runs; the
parent run is shown with its trials nested under it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

from .mlflow_runs import is_sqlite

DEFAULT_UI = "http://127.0.0.1:5000"


def mlflow_program() -> str:
    """The ``mlflow`` next to this Python (a virtual environment's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mlflow"
    if beside.exists():
        found = shutil.which("mlflow")
        return "mlflow" if found and Path(found).resolve() == beside.resolve() else str(beside)
    return "mlflow"


def ui_command(uri: str) -> str | None:
    """The command that serves the UI for a SQLite store (None for a tracking server)."""
    if not is_sqlite(uri):
        return None
    return f"{mlflow_program()} ui --backend-store-uri {uri}"


def runs_url(uri: str, experiment_id: str, sweep_name: str | None = None) -> str:
    """The runs table of ``experiment_id`` in the model-training view, optionally one sweep's runs."""
    base = DEFAULT_UI if is_sqlite(uri) else uri.rstrip("/")
    query = {"workflowType": "machine_learning"}
    if sweep_name:
        query["searchFilter"] = f"tags.`qat.sweep_name` = '{sweep_name}'"
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"
