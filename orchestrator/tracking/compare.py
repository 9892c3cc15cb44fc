"""Comparing the trials of one or more sweeps from MLflow: rows, ranking, table, CSV, best export.

Everything here reads MLflow (``search_runs``, run data, artifacts), never Tune's files, so a
comparison works anywhere the tracking server is reachable. One name per metric everywhere
(MLflow, table, CSV, plot): ``fp32_acc``, ``ptq_acc`` (test accuracy after calibration only),
``val_acc`` (what sweeps select on), ``test_acc`` (after QAT), ``gain`` = ``test_acc - ptq_acc``.
A difference of at most one sample (``100 / val_samples`` or ``100 / test_samples`` percent) is a
tie: tied trials share a rank (``2=``) and a tied gain reads ``tie``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .mlflow_runs import KIND_TAG, PARENT_TAG, client, retrying
from .run_content import OUTCOME_TAG

SPACE_PREFIX = "space."  # the sweep's parent run holds one param per swept key: space.<key>


class CompareError(ValueError):
    """The sweep to compare cannot be found, or has nothing to compare."""


@dataclass
class Sweep:
    name: str
    run_id: str
    swept: list[str]  # swept keys, as Hydra overrides name them
    metric: str
    best_run_id: str | None


@dataclass
class TrialRow:
    sweep: str
    run_id: str
    name: str
    status: str  # MLflow's: FINISHED, FAILED, KILLED, RUNNING
    outcome: str  # qat.outcome: finished, stopped_by_scheduler, diverged, failed, interrupted
    point: dict[str, str]
    bits: str
    mode: str
    lr: float
    epochs: int
    fp32_acc: float
    ptq_acc: float
    val_acc: float
    test_acc: float
    val_samples: float
    test_samples: float
    wall_s: float
    rank: str = ""
    gain_tie: bool = False

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and not math.isnan(self.test_acc)

    @property
    def gain(self) -> float:
        return self.test_acc - self.ptq_acc


def find_sweep(uri: str, experiment: str, sweep: str | None) -> Sweep:
    """A sweep's parent run: by run id, else by sweep name (latest such), else the latest sweep."""
    c = client(uri)
    exp = retrying(lambda: c.get_experiment_by_name(experiment))
    if exp is None:
        raise CompareError(f"MLflow at {uri} has no experiment {experiment!r}")
    run = None
    if sweep:
        try:
            candidate = retrying(lambda: c.get_run(sweep))
            run = candidate if candidate.data.tags.get(KIND_TAG) == "sweep" else None
        except Exception:
            run = None
    if run is None:
        filt = f"tags.`{KIND_TAG}` = 'sweep'" + (f" and tags.`qat.sweep_name` = '{sweep}'" if sweep else "")
        runs = retrying(lambda: c.search_runs([exp.experiment_id], filter_string=filt,
                                              order_by=["attributes.start_time DESC"], max_results=1))
        if not runs:
            what = f"named or with run id {sweep!r}" if sweep else "at all"
            raise CompareError(f"no sweep {what} in experiment {experiment!r} at {uri}")
        run = runs[0]
    params, tags = run.data.params, run.data.tags
    swept = [k[len(SPACE_PREFIX):] for k in params if k.startswith(SPACE_PREFIX)]
    return Sweep(tags.get("qat.sweep_name", run.info.run_id), run.info.run_id, sorted(swept),
                 params.get("sweep.metric", "val_acc"), tags.get("best_run_id"))


def _metric(run, key: str) -> float:
    return float(run.data.metrics.get(key, math.nan))


def trial_rows(uri: str, sweep: Sweep) -> list[TrialRow]:
    """One row per child run of the sweep (its trials), in no particular order."""
    c = client(uri)
    parent = retrying(lambda: c.get_run(sweep.run_id))
    children = retrying(lambda: c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{sweep.run_id}'", max_results=10_000))
    rows = []
    for run in children:
        p, t = run.data.params, run.data.tags
        end = run.info.end_time or run.info.start_time
        rows.append(TrialRow(
            sweep=sweep.name, run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
            outcome=t.get(OUTCOME_TAG, run.info.status.lower()),
            point={k: p.get(k.lstrip("+~"), "") for k in sweep.swept},
            bits=t.get("qat.bits", f"w{t.get('qat.param_bw', '?')}a{t.get('qat.output_bw', '?')}"),
            mode=t.get("qat.mode", ""), lr=float(p.get("qat.lr", "nan")), epochs=int(p.get("qat.epochs", "0")),
            fp32_acc=_metric(run, "fp32_acc"), ptq_acc=_metric(run, "ptq_acc"), val_acc=_metric(run, "val_acc"),
            test_acc=_metric(run, "test_acc"), val_samples=_metric(run, "val_samples"),
            test_samples=_metric(run, "test_samples"), wall_s=(end - run.info.start_time) / 1000.0,
        ))
    return rows


def one_sample(samples: float) -> float:
    """One sample's worth of accuracy in percent (0 when the count is unknown)."""
    return 100.0 / samples if samples and not math.isnan(samples) else 0.0


def rank(rows: list[TrialRow], metric: str = "val_acc") -> list[TrialRow]:
    """Finished trials first, best ``metric`` first; ranks shared within one validation sample;
    gains within one test sample flagged as ties. Returns the rows sorted (and annotated)."""
    def key(r: TrialRow) -> tuple:
        value = getattr(r, metric)
        return (not r.finished, math.isnan(value), -(0.0 if math.isnan(value) else value),
                -(0.0 if math.isnan(r.test_acc) else r.test_acc), r.name)

    ordered = sorted(rows, key=key)
    leader: TrialRow | None = None
    for i, r in enumerate(ordered):
        r.gain_tie = abs(r.gain) <= one_sample(r.test_samples) + 1e-9 if not math.isnan(r.gain) else False
        if not r.finished:
            r.rank = "-"
            continue
        value = getattr(r, metric)
        tol = one_sample(r.val_samples) if metric == "val_acc" else one_sample(r.test_samples)
        if leader is not None and abs(getattr(leader, metric) - value) <= tol + 1e-9:
            r.rank = f"{leader.rank.rstrip('=')}="
            if not leader.rank.endswith("="):
                leader.rank += "="
        else:
            r.rank, leader = str(i + 1), r
    return ordered


def _num(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def gain_text(r: TrialRow) -> str:
    return "tie" if r.gain_tie else _num(r.gain, signed=True)


COLUMNS = ("sweep", "rank", "name", "outcome", "bits", "mode", "lr", "epochs", "fp32_acc", "ptq_acc", "val_acc",
           "test_acc", "gain", "gain_is_tie", "val_samples", "test_samples", "wall_s", "status", "run_id")


def format_rows(rows: list[TrialRow], metric: str = "val_acc") -> str:
    """A table of ranked rows; a ``sweep`` column when they come from several sweeps."""
    several = len({r.sweep for r in rows}) > 1
    header = (("sweep",) if several else ()) + ("rank", "trial", "fp32_acc", "ptq_acc", "val_acc", "test_acc",
                                                "gain", "outcome", "wall s")
    body = [(((r.sweep,) if several else ()) + (r.rank, r.name, _num(r.fp32_acc), _num(r.ptq_acc), _num(r.val_acc),
                                               _num(r.test_acc), gain_text(r), r.outcome, f"{r.wall_s:.0f}"))
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    legend = (f"ranked by {metric}; '=' ties within one validation sample; gain = test_acc - ptq_acc, "
              "'tie' within one test sample")
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(b) for b in body] + [legend])


def write_csv(rows: list[TrialRow], path: str | Path) -> None:
    from ..fileio import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS + tuple(sorted({k for r in rows for k in r.point})))
            w.writeheader()
            for r in rows:
                w.writerow({"sweep": r.sweep, "rank": r.rank, "name": r.name, "outcome": r.outcome, "bits": r.bits,
                            "mode": r.mode, "lr": r.lr, "epochs": r.epochs, "fp32_acc": r.fp32_acc,
                            "ptq_acc": r.ptq_acc, "val_acc": r.val_acc, "test_acc": r.test_acc, "gain": r.gain,
                            "gain_is_tie": r.gain_tie, "val_samples": r.val_samples, "test_samples": r.test_samples,
                            "wall_s": round(r.wall_s, 1), "status": r.status, "run_id": r.run_id, **r.point})

    atomic_write(path, write)


def download_export(uri: str, run_id: str, dest: str | Path) -> Path:
    """Download the run's ``export/`` artifacts (weights + encodings) into ``dest/``."""
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    local = retrying(lambda: c.download_artifacts(run_id, "export", str(dest)))
    return Path(local)
