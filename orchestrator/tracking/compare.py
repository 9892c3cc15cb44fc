"""Comparing the trials of one or more sweeps from MLflow: rows, ranking, table, CSV, best export.

Everything here reads MLflow (``search_runs``, run data, artifacts), never Tune's files, so a
comparison works anywhere the tracking server is reachable. One name per metric everywhere
(MLflow, table, CSV, plot), for the task metric ``m`` the sweep selected on (``acc``, ``ppl``):
``fp32_m``, ``ptq_m`` (test split after calibration only), ``val_m`` (what the sweep selected
on), ``test_m`` (after QAT), and ``gain``: how much QAT improved on PTQ in the metric's good
direction (``test_acc - ptq_acc``; ``ptq_ppl - test_ppl``); ``recovered``: the fraction of PTQ's
loss that QAT won back (``recovery.py``; shown where PTQ lost at least 2%, with ``ptq_gap``, PTQ's
loss relative to FP32, in the CSV). For a percentage of samples
(accuracy), a difference of at most one sample (``100 / val_samples`` or ``100 / test_samples``)
is a tie: tied trials share a rank (``2=``) and a tied gain reads ``tie``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .mlflow_runs import KIND_TAG, PARENT_TAG, client, retrying
from .recovery import MIN_GAP, ptq_gap, recovered
from .run_content import OUTCOME_TAG

SPACE_PREFIX = "space."  # the sweep's parent run holds one param per swept key: space.<key>


class CompareError(ValueError):
    """The sweep to compare cannot be found, or has nothing to compare."""


@dataclass
class Sweep:
    name: str
    run_id: str
    swept: list[str]  # swept keys, as Hydra overrides name them
    metric: str  # the selection metric, "val_<m>"
    best_run_id: str | None
    mode: str = "max"
    tie_on_samples: bool = True

    @property
    def base(self) -> str:
        """The task metric without its stage: ``val_acc`` -> ``acc``."""
        return self.metric[len("val_"):] if self.metric.startswith("val_") else self.metric


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
    metric: str  # the task metric compared: "acc", "ppl", ...
    fp32: float
    ptq: float
    val: float
    test: float
    val_samples: float
    test_samples: float
    wall_s: float
    higher_is_better: bool = True
    tie_on_samples: bool = True
    rank: str = ""
    gain_tie: bool = False

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and not math.isnan(self.test)

    @property
    def gain(self) -> float:
        """QAT's improvement over PTQ on the test split, positive when QAT is better."""
        return self.test - self.ptq if self.higher_is_better else self.ptq - self.test

    @property
    def ptq_gap(self) -> float:
        """PTQ's loss relative to FP32 (``recovery.py``)."""
        return ptq_gap(self.fp32, self.ptq, self.higher_is_better)

    @property
    def recovered(self) -> float:
        """The fraction of PTQ's loss QAT won back (NaN where PTQ lost under 2%)."""
        return recovered(self.fp32, self.ptq, self.test, self.higher_is_better)

    def stage(self, stage: str) -> float:
        """The value at ``stage`` (fp32, ptq, val, test)."""
        return getattr(self, stage)


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
                 params.get("sweep.metric", "val_acc"), tags.get("best_run_id"), params.get("sweep.mode", "max"),
                 params.get("sweep.tie_on_samples", "True") == "True")


def _metric(run, key: str) -> float:
    return float(run.data.metrics.get(key, math.nan))


def trial_rows(uri: str, sweep: Sweep) -> list[TrialRow]:
    """One row per child run of the sweep (its trials), in no particular order."""
    c = client(uri)
    parent = retrying(lambda: c.get_run(sweep.run_id))
    children = retrying(lambda: c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{sweep.run_id}'", max_results=10_000))
    rows = []
    m = sweep.base
    for run in children:
        p, t = run.data.params, run.data.tags
        end = run.info.end_time or run.info.start_time
        rows.append(TrialRow(
            sweep=sweep.name, run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
            outcome=t.get(OUTCOME_TAG, run.info.status.lower()),
            point={k: p.get(k.lstrip("+~"), "") for k in sweep.swept},
            bits=t.get("qat.bits", f"w{t.get('qat.param_bw', '?')}a{t.get('qat.output_bw', '?')}"),
            mode=t.get("qat.mode", ""), lr=float(p.get("qat.lr", "nan")), epochs=int(p.get("qat.epochs", "0")),
            metric=m, fp32=_metric(run, f"fp32_{m}"), ptq=_metric(run, f"ptq_{m}"), val=_metric(run, f"val_{m}"),
            test=_metric(run, f"test_{m}"), val_samples=_metric(run, "val_samples"),
            test_samples=_metric(run, "test_samples"), wall_s=(end - run.info.start_time) / 1000.0,
            higher_is_better=sweep.mode == "max", tie_on_samples=sweep.tie_on_samples,
        ))
    return rows


def one_sample(samples: float, percent: bool = True) -> float:
    """One sample's worth of a percentage-of-samples metric (0 when the count is unknown or the
    metric is not such a percentage)."""
    return 100.0 / samples if percent and samples and not math.isnan(samples) else 0.0


def rank(rows: list[TrialRow], stage: str = "val") -> list[TrialRow]:
    """Finished trials first, best value at ``stage`` first (the metric's own direction); ranks
    shared within one validation sample; gains within one test sample flagged as ties. Returns the
    rows sorted (and annotated)."""
    def good(r: TrialRow, value: float) -> float:
        return 0.0 if math.isnan(value) else (value if r.higher_is_better else -value)

    def key(r: TrialRow) -> tuple:
        value = r.stage(stage)
        return (not r.finished, math.isnan(value), -good(r, value), -good(r, r.test), r.name)

    ordered = sorted(rows, key=key)
    leader: TrialRow | None = None
    for i, r in enumerate(ordered):
        tie = one_sample(r.test_samples, r.tie_on_samples)
        r.gain_tie = abs(r.gain) <= tie + 1e-9 if not math.isnan(r.gain) and tie > 0 else False
        if not r.finished:
            r.rank = "-"
            continue
        value = r.stage(stage)
        tol = one_sample(r.val_samples if stage == "val" else r.test_samples, r.tie_on_samples)
        if leader is not None and abs(leader.stage(stage) - value) <= tol + 1e-9:
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


def recovered_text(r: TrialRow) -> str:
    """``87%``; ``-`` where PTQ lost under 2% (or a value is missing)."""
    return "-" if math.isnan(r.recovered) else f"{100 * r.recovered:.0f}%"


STAGES = ("fp32", "ptq", "val", "test")


def columns(metric: str) -> tuple[str, ...]:
    """The CSV's columns for task metric ``metric``."""
    return (("sweep", "rank", "name", "outcome", "bits", "mode", "lr", "epochs")
            + tuple(f"{s}_{metric}" for s in STAGES)
            + ("gain", "gain_is_tie", f"{metric}_ptq_gap", f"{metric}_recovered", "val_samples", "test_samples",
               "wall_s", "status", "run_id"))


def format_rows(rows: list[TrialRow], metric: str = "val_acc") -> str:
    """A table of ranked rows (``metric``: what they were ranked by, ``val_<m>``); a ``sweep``
    column when they come from several sweeps."""
    several = len({r.sweep for r in rows}) > 1
    m = rows[0].metric if rows else metric[len("val_"):]
    header = ((("sweep",) if several else ()) + ("rank", "trial") + tuple(f"{s}_{m}" for s in STAGES)
              + ("gain", "recovered", "outcome", "wall s"))
    body = [(((r.sweep,) if several else ()) + (r.rank, r.name) + tuple(_num(r.stage(s)) for s in STAGES)
             + (gain_text(r), recovered_text(r), r.outcome, f"{r.wall_s:.0f}")) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    better = "test - ptq" if not rows or rows[0].higher_is_better else "ptq - test (lower is better)"
    ties = rows and rows[0].tie_on_samples
    legend = (f"ranked by {metric}" + ("; '=' ties within one validation sample" if ties else "")
              + f"; gain = {better}" + (", 'tie' within one test sample" if ties else "")
              + f"; recovered = (ptq - test) / (ptq - fp32) where PTQ lost at least {100 * MIN_GAP:.0f}% of FP32")
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(b) for b in body] + [legend])


def write_csv(rows: list[TrialRow], path: str | Path) -> None:
    from ..fileio import atomic_write

    m = rows[0].metric if rows else "acc"

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns(m) + tuple(sorted({k for r in rows for k in r.point})))
            w.writeheader()
            for r in rows:
                w.writerow({"sweep": r.sweep, "rank": r.rank, "name": r.name, "outcome": r.outcome, "bits": r.bits,
                            "mode": r.mode, "lr": r.lr, "epochs": r.epochs,
                            **{f"{s}_{m}": r.stage(s) for s in STAGES}, "gain": r.gain,
                            "gain_is_tie": r.gain_tie, f"{m}_ptq_gap": r.ptq_gap, f"{m}_recovered": r.recovered,
                            "val_samples": r.val_samples, "test_samples": r.test_samples,
                            "wall_s": round(r.wall_s, 1), "status": r.status, "run_id": r.run_id, **r.point})

    atomic_write(path, write)


def download_export(uri: str, run_id: str, dest: str | Path) -> Path:
    """Download the run's ``export/`` artifacts (weights + encodings) into ``dest/``."""
    dest = Path(dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    local = retrying(lambda: c.download_artifacts(run_id, "export", str(dest)))
    return Path(local)
