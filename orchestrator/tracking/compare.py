"""Comparing the trials of a sweep from MLflow: rows, CSV, plot, best export.

Everything here reads MLflow (``search_runs``, run data, artifacts), never Tune's files, so a
comparison works anywhere the tracking server is reachable.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .mlflow_runs import KIND_TAG, PARENT_TAG, client, retrying


class CompareError(ValueError):
    """The sweep to compare cannot be found, or has nothing to compare."""


@dataclass
class TrialRow:
    run_id: str
    name: str
    status: str
    lr: float
    epochs: int
    mode: str
    bits: str
    fp32_acc: float
    ptq_acc: float
    val_acc: float
    qat_acc: float  # test accuracy after QAT
    delta: float  # qat_acc - fp32_acc
    wall_s: float


def find_sweep(uri: str, experiment: str, sweep: str | None):
    """The sweep's parent run: by run id, else by sweep name (latest such), else the latest sweep."""
    c = client(uri)
    exp = retrying(lambda: c.get_experiment_by_name(experiment))
    if exp is None:
        raise CompareError(f"MLflow at {uri} has no experiment {experiment!r}")
    if sweep:
        try:
            run = retrying(lambda: c.get_run(sweep))
            if run.data.tags.get(KIND_TAG) == "sweep":
                return run
        except Exception:
            pass
    filt = f"tags.`{KIND_TAG}` = 'sweep'" + (f" and tags.`qat.sweep_name` = '{sweep}'" if sweep else "")
    runs = retrying(lambda: c.search_runs([exp.experiment_id], filter_string=filt,
                                          order_by=["attributes.start_time DESC"], max_results=1))
    if not runs:
        what = f"named or with run id {sweep!r}" if sweep else "at all"
        raise CompareError(f"no sweep {what} in experiment {experiment!r} at {uri}")
    return runs[0]


def _metric(run, key: str) -> float:
    return float(run.data.metrics.get(key, math.nan))


def trial_rows(uri: str, parent) -> list[TrialRow]:
    """One row per child run of ``parent`` (its trials), in no particular order."""
    c = client(uri)
    children = retrying(lambda: c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        max_results=10_000))
    rows = []
    for run in children:
        p, t = run.data.params, run.data.tags
        end = run.info.end_time or run.info.start_time
        fp32, qat = _metric(run, "fp32_acc"), _metric(run, "test_acc")
        rows.append(TrialRow(
            run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
            lr=float(p.get("qat.lr", "nan")), epochs=int(p.get("qat.epochs", "0")),
            mode=t.get("qat.mode", ""), bits=f"W{t.get('qat.param_bw', '?')}A{t.get('qat.output_bw', '?')}",
            fp32_acc=fp32, ptq_acc=_metric(run, "ptq_acc"), val_acc=_metric(run, "val_acc"), qat_acc=qat,
            delta=qat - fp32, wall_s=(end - run.info.start_time) / 1000.0,
        ))
    return rows


def rank(rows: list[TrialRow], metric: str = "val_acc") -> list[TrialRow]:
    """Finished trials first, best ``metric`` (val_acc / qat_acc, higher is better) first."""
    def key(r: TrialRow) -> tuple:
        value = getattr(r, metric)
        return (r.status != "FINISHED", math.isnan(value), -(0.0 if math.isnan(value) else value),
                -(0.0 if math.isnan(r.qat_acc) else r.qat_acc), r.name)

    return sorted(rows, key=key)


COLUMNS = ("name", "lr", "epochs", "mode", "bits", "fp32_acc", "ptq_acc", "val_acc", "qat_acc", "delta", "wall_s",
           "status", "run_id")


def format_rows(rows: list[TrialRow]) -> str:
    header = ("trial", "lr", "epochs", "mode", "bits", "FP32", "PTQ", "val", "QAT", "Δ vs FP32", "wall s", "status")
    body = [(r.name.split(" ")[0], f"{r.lr:.3g}", str(r.epochs), r.mode, r.bits, f"{r.fp32_acc:.2f}",
             f"{r.ptq_acc:.2f}", f"{r.val_acc:.2f}", f"{r.qat_acc:.2f}", f"{r.delta:+.2f}", f"{r.wall_s:.0f}",
             r.status) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(b) for b in body])


def write_csv(rows: list[TrialRow], path: str | Path) -> None:
    from ..fileio import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                d = asdict(r)
                w.writerow({k: d[k] for k in COLUMNS})

    atomic_write(path, write)


def write_plot(rows: list[TrialRow], path: str | Path, title: str) -> None:
    """QAT accuracy vs lr (log x), one line per mode x epochs; FP32 and PTQ as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, int], list[TrialRow]] = {}
    for r in rows:
        if not math.isnan(r.qat_acc) and not math.isnan(r.lr):
            groups.setdefault((r.mode, r.epochs), []).append(r)
    for (mode, epochs), members in sorted(groups.items()):
        members.sort(key=lambda r: r.lr)
        ax.plot([r.lr for r in members], [r.qat_acc for r in members], marker="o", label=f"{mode}, {epochs} epoch(s)")
    fp32 = [r.fp32_acc for r in rows if not math.isnan(r.fp32_acc)]
    ptq = [r.ptq_acc for r in rows if not math.isnan(r.ptq_acc)]
    if fp32:
        ax.axhline(sum(fp32) / len(fp32), color="black", linestyle="--", label="FP32")
    if ptq:
        ax.axhline(sum(ptq) / len(ptq), color="gray", linestyle=":", label="PTQ (no training)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy after QAT (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def download_export(uri: str, run_id: str, dest: str | Path) -> Path:
    """Download the run's ``export/`` artifacts (weights + encodings) into ``dest/``."""
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    local = retrying(lambda: c.download_artifacts(run_id, "export", str(dest)))
    return Path(local)
