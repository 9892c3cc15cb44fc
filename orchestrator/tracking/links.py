"""Where to look at a sweep: the ``mlflow ui`` command for a SQLite store and the runs-table URL.

The URL opens the experiment's runs table in the UI's model-training view
(``workflowType=machine_learning``; the experiment also carries
``mlflow.experimentKind=custom_model_development``) through a view the sweep saves with the
UI's own sharing mechanism (an experiment tag ``mlflow.sharedViewState.<key>`` that
``?viewStateShareKey=<key>`` loads): the sweep's runs only, the parent run with its trials
nested under it, and columns for the metrics, the swept params and each trial's outcome.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

from .mlflow_runs import client, is_sqlite, retrying

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_STAGES = ("val", "test", "ptq", "fp32")  # the view's metric columns: <stage>_<the sweep's metric>
RUN_NAME_COLUMN = "attributes.`Run Name`"

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
    return shlex.join([mlflow_program(), "ui", "--backend-store-uri", uri])


def view_key(sweep_name: str) -> str:
    return f"qat-sweep-{sweep_name}"


def save_sweep_view(uri: str, experiment_id: str, sweep_name: str, swept: list[str], metric: str = "acc") -> str:
    """Save the sweep's runs-table view in the experiment (the UI's shared-view tag); its key.
    ``metric``: the task metric shown at every stage (``acc``: ``val_acc``, ``test_acc``, ...)."""
    metrics = [f"{stage}_{metric}" for stage in VIEW_STAGES]
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{k}`" for k in swept] + ["tags.`qat.outcome`"]
    state = {
        "searchFilter": f"tags.`qat.sweep_name` = '{sweep_name}'",
        "selectedColumns": columns,
        # the grid's own column ids: selection box, name, start time (with nesting), duration, ours
        "columnOrder": ["0", RUN_NAME_COLUMN, "runDateAndNestInfo", "duration", *columns],
        # trial names whole (indented under their parent), accuracies to their last digit
        "columnWidths": {RUN_NAME_COLUMN: 320, **{f"metrics.`{m}`": 140 for m in metrics}},
    }
    key = view_key(sweep_name)
    retrying(lambda: client(uri).set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, json.dumps(state)))
    return key


def runs_url(uri: str, experiment_id: str, sweep_name: str | None = None, ui: str | None = None) -> str:
    """The runs table of ``experiment_id`` in the model-training view, with the saved view of
    ``sweep_name`` when given. ``ui``: the UI's address (default: a tracking server's own URI,
    else ``mlflow ui``'s default)."""
    base = (ui or (DEFAULT_UI if is_sqlite(uri) else uri)).rstrip("/")
    query = {"workflowType": "machine_learning"}
    if sweep_name:
        query["viewStateShareKey"] = view_key(sweep_name)
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"
