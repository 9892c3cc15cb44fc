"""Is the tracking URI usable? Checked before a trial or sweep creates anything, in seconds.

MLflow itself retries an unreachable server for ~250 s and names an unknown scheme with a
``KeyError``; here each case is one line naming ``tracking.uri``, its value and what to do.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .mlflow_runs import is_sqlite, sqlite_path

SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")
TIMEOUT_S = 5.0


class TrackingUnavailable(ValueError):
    """The tracking URI cannot be used (bad scheme, no server, unwritable database)."""


def scheme(uri: str) -> str:
    """``sqlite``, ``http``, ... (``postgresql+psycopg`` -> ``postgresql``); ``""`` for a plain path."""
    from urllib.parse import urlparse

    if uri == "databricks" or uri.startswith("databricks-uc"):
        return "databricks"
    return urlparse(uri).scheme.split("+", 1)[0]


def check_tracking(uri: str, key: str = "tracking.uri", timeout: float = TIMEOUT_S) -> None:
    """Raise ``TrackingUnavailable`` unless ``uri`` names a reachable MLflow store: a known scheme;
    a server that answers ``/health`` within ``timeout`` seconds; a SQLite file that can be created."""
    kind = scheme(uri)
    if kind == "" and uri.strip():  # a plain path: MLflow's file store, which MLflow 3 refuses unless allowed
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise TrackingUnavailable(f"{key}={uri!r}: MLflow 3 refuses a file store (a plain path) unless "
                                      "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:////abs/path/mlflow.db instead")
        return
    if kind not in SCHEMES:
        raise TrackingUnavailable(f"{key}={uri!r} is not a tracking URI MLflow can use; allowed: "
                                  "sqlite:////abs/path/mlflow.db, http(s)://host:port of an mlflow server, "
                                  "a database URI (postgresql://...)")
    if kind in ("http", "https"):
        _check_server(uri, key, timeout)
    elif is_sqlite(uri):
        _check_sqlite(uri, key)


def _check_server(uri: str, key: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"{key}={uri!r}: no MLflow server answers there within {timeout:g} s "
                                  f"({reason}); start one (launch/mlflow-server.sh) or fix {key}") from None
    if status >= 500:
        raise TrackingUnavailable(f"{key}={uri!r}: the MLflow server answers /health with HTTP {status}; "
                                  "check its log and its database")


def _check_sqlite(uri: str, key: str) -> None:
    path = sqlite_path(uri)
    if not path.is_absolute():
        raise TrackingUnavailable(f"{key}={uri!r}: a SQLite URI must hold an absolute path "
                                  "(sqlite:////abs/path/mlflow.db): trials change working directories")
    if path.exists():
        if not path.is_file():
            raise TrackingUnavailable(f"{key}={uri!r}: {path} is not a file")
        return
    ancestor = Path(path).parent
    while not ancestor.exists():  # created with the database; nothing is written here
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise TrackingUnavailable(f"{key}={uri!r}: cannot create {path}: {ancestor} is not a writable directory")
