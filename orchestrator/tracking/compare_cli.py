"""``qat-compare``: what won one or more sweeps, read from MLflow.

    qat-compare                                    # the latest sweep in ./outputs/mlflow.db
    qat-compare --sweep default --export-best best/
    qat-compare --sweep default --sweep bits       # two sweeps side by side
    qat-compare --sweep <parent run id> --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..console import quiet_libraries
from .compare import CompareError, download_export, find_sweep, format_rows, rank, trial_rows, write_csv
from .mlflow_runs import default_tracking_uri
from .plot import write_plot
from .preflight import TrackingUnavailable, check_tracking


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qat-compare", description="Compare the trials of QAT sweeps from MLflow: "
                                "a ranked table, a CSV, a PNG plot, and optionally the best trial's export.")
    p.add_argument("--sweep", action="append", help="sweep name or parent run id; repeat to compare sweeps side "
                   "by side (default: the latest sweep)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///<abs>/outputs/mlflow.db)")
    p.add_argument("--experiment", default="qat", help="MLflow experiment (default: qat)")
    p.add_argument("--out", help="directory for the CSV and PNG (default: outputs/compare/<sweep>[_<sweep>...])")
    p.add_argument("--export-best", metavar="DIR", help="download the best trial's export (weights + encodings) "
                   "here (the first sweep's best)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_libraries()
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("outputs")
    try:
        if uri.startswith("sqlite:") and not Path(uri[len("sqlite:///"):]).exists():
            raise CompareError(f"no MLflow database at {uri}; run qat-sweep first or pass --tracking-uri")
        check_tracking(uri, key="--tracking-uri")
        sweeps = [find_sweep(uri, args.experiment, s) for s in (args.sweep or [None])]
        rows_by_sweep = {s.name: rank(trial_rows(uri, s)) for s in sweeps}
        empty = [s.name for s in sweeps if not rows_by_sweep[s.name]]
        if empty:
            raise CompareError(f"sweep {empty[0]!r} has no trial runs yet")
    except (CompareError, TrackingUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = "_".join(s.name for s in sweeps)
    out = Path(args.out or Path("outputs") / "compare" / label).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for s in sweeps for r in rows_by_sweep[s.name]]
    csv_path, png_path = out / f"{label}.csv", out / f"{label}.png"
    write_csv(rows, csv_path)
    swept = sorted({k for s in sweeps for k in s.swept})
    write_plot(rows, swept, png_path, " vs ".join(f"sweep {s.name}" for s in sweeps))
    for s in sweeps:
        print(f"sweep {s.name} (parent run {s.run_id}), swept: {', '.join(s.swept) or 'nothing'}")
    print(format_rows(rows, sweeps[0].metric))
    print(f"csv: {csv_path}\nplot: {png_path}")
    if args.export_best:
        best = rows_by_sweep[sweeps[0].name][0]
        if not best.finished:
            print("error: no finished trial to export", file=sys.stderr)
            return 2
        path = download_export(uri, best.run_id, args.export_best)
        print(f"best trial {best.name} ({sweeps[0].metric} {best.val:.2f}): export downloaded to {path}")
    return 0
