"""``qat-compare``: what won a sweep, read from MLflow.

    qat-compare                               # the latest sweep in ./outputs/mlflow.db
    qat-compare --sweep default --export-best best/
    qat-compare --sweep <parent run id> --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .compare import (
    CompareError,
    download_export,
    find_sweep,
    format_rows,
    rank,
    trial_rows,
    write_csv,
    write_plot,
)
from .mlflow_runs import default_tracking_uri

METRICS = {"val_acc": "val_acc", "test_acc": "qat_acc"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qat-compare", description="Compare the trials of a QAT sweep from MLflow: "
                                "a table, a CSV, a PNG plot, and optionally the best trial's export.")
    p.add_argument("--sweep", help="sweep name or parent run id (default: the latest sweep)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///<abs>/outputs/mlflow.db)")
    p.add_argument("--experiment", default="qat", help="MLflow experiment (default: qat)")
    p.add_argument("--metric", choices=sorted(METRICS), help="rank trials by this (default: the sweep's metric)")
    p.add_argument("--out", help="directory for the CSV and PNG (default: outputs/compare/<sweep>)")
    p.add_argument("--export-best", metavar="DIR", help="download the best trial's export (weights + encodings) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("outputs")
    try:
        if uri.startswith("sqlite:") and not Path(uri[len("sqlite:///"):]).exists():
            raise CompareError(f"no MLflow database at {uri}; run qat-sweep first or pass --tracking-uri")
        parent = find_sweep(uri, args.experiment, args.sweep)
        rows = trial_rows(uri, parent)
        if not rows:
            raise CompareError(f"sweep run {parent.info.run_id} has no trial runs yet")
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = parent.data.tags.get("qat.sweep_name", parent.info.run_id)
    metric = args.metric or parent.data.params.get("sweep.metric", "val_acc")
    rows = rank(rows, METRICS.get(metric, "val_acc"))
    out = Path(args.out or Path("outputs") / "compare" / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{name}.csv", out / f"{name}.png"
    write_csv(rows, csv_path)
    write_plot(rows, png_path, f"sweep {name}")
    print(f"sweep {name} (parent run {parent.info.run_id}), ranked by {metric}:")
    print(format_rows(rows))
    print(f"csv: {csv_path}\nplot: {png_path}")
    if args.export_best:
        best = rows[0]
        if best.status != "FINISHED":
            print("error: no finished trial to export", file=sys.stderr)
            return 2
        path = download_export(uri, best.run_id, args.export_best)
        print(f"best trial {best.name.split(' ')[0]} ({metric} {getattr(best, METRICS[metric]):.2f}): export "
              f"downloaded to {path}")
    return 0
