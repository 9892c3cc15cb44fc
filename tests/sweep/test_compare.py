"""qat-compare on real MLflow runs (SQLite): ranking with ties, one metric name, faceted plots,
several sweeps side by side. The runs are written with MlflowClient as a sweep writes them."""

from __future__ import annotations

import csv

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from orchestrator.tracking.compare import find_sweep, rank, trial_rows
from orchestrator.tracking.compare_cli import main as compare
from orchestrator.tracking.mlflow_runs import ensure_experiment
from orchestrator.tracking.plot import layout, write_plot

VAL, TEST = 268, 360  # digits' validation and test set sizes: one sample = 0.373 / 0.278 points


def pct(correct: int, total: int = TEST) -> float:
    return 100.0 * correct / total


def make_sweep(uri: str, name: str, space: dict[str, str], trials: list[dict]) -> str:
    c = MlflowClient(uri)
    exp = ensure_experiment(uri, "qat")
    parent = c.create_run(exp, run_name=f"sweep {name}", tags={"qat.kind": "sweep", "qat.sweep_name": name})
    params = {**{f"space.{k}": v for k, v in space.items()}, "sweep.metric": "val_acc"}
    c.log_batch(parent.info.run_id, params=[Param(k, v) for k, v in params.items()])
    for t in trials:
        bits, mode = t.get("bits", "w4a4"), t.get("mode", "static")
        run = c.create_run(exp, run_name=t["name"], tags={
            "mlflow.parentRunId": parent.info.run_id, "qat.kind": "trial", "qat.bits": bits, "qat.mode": mode,
            "qat.outcome": t.get("outcome", "finished")})
        rid = run.info.run_id
        params = {"qat.lr": t.get("lr", 1e-3), "qat.epochs": t.get("epochs", 1), **t.get("params", {})}
        metrics = {"fp32_acc": 100.0, "ptq_acc": t["ptq"], "val_acc": t["val"], "val_samples": VAL,
                   "test_samples": TEST}
        if "test" in t:
            metrics["test_acc"] = t["test"]
        c.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()],
                    metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        c.set_terminated(rid, t.get("status", "FINISHED"))
    c.set_terminated(parent.info.run_id)
    return parent.info.run_id


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def default_like(uri, name="default"):
    trials = []
    for lr in (1e-3, 1e-4):
        for epochs in (1, 3):
            for mode in ("static", "range_learning"):
                good = lr == 1e-3 and epochs == 3
                trials.append({"name": f"w4a4 lr={lr:g} ep={epochs} {mode}", "lr": lr, "epochs": epochs,
                               "mode": mode, "ptq": 99.44, "val": 98.88 if good else 97.76,
                               "test": 99.72 if good else 99.44})
    make_sweep(uri, name, {"qat.lr": "0.001,0.0001", "qat.epochs": "1,3", "qat.range_learning": "false,true"}, trials)


def test_ranks_share_within_one_validation_sample_and_tiny_gains_are_ties(uri):
    make_sweep(uri, "s", {"qat.lr": "0.001,0.002,0.003,0.004"}, [
        {"name": "a", "lr": 1e-3, "ptq": pct(358), "val": pct(265, VAL), "test": pct(359)},  # gain: one sample
        {"name": "b", "lr": 2e-3, "ptq": pct(358), "val": pct(264, VAL), "test": pct(358)},  # one sample below a
        {"name": "c", "lr": 3e-3, "ptq": pct(324), "val": pct(260, VAL), "test": pct(353)},
        {"name": "d", "lr": 4e-3, "ptq": pct(358), "val": pct(267, VAL), "outcome": "stopped_by_scheduler"},
    ])
    rows = rank(trial_rows(uri, find_sweep(uri, "qat", "s")))
    assert [(r.name, r.rank) for r in rows] == [("a", "1="), ("b", "1="), ("c", "3"), ("d", "-")]
    by = {r.name: r for r in rows}
    assert by["a"].gain_tie and by["b"].gain_tie and not by["c"].gain_tie  # +0.28 is one test sample
    assert by["c"].gain == pytest.approx(pct(29)) and by["d"].outcome == "stopped_by_scheduler"


def test_plot_axes_and_facets_follow_the_swept_keys(uri):
    default_like(uri)
    rows = trial_rows(uri, find_sweep(uri, "qat", "default"))
    lay = layout(rows, ["qat.epochs", "qat.lr", "qat.range_learning"])
    assert (lay.x, lay.hue, lay.facets, lay.log_x) == ("lr", "mode", ["epochs"], True)
    bits = layout(rows, ["quant", "qat.range_learning"])
    assert (bits.x, bits.hue, bits.facets, bits.numeric_x) == ("bits", "mode", [], False)
    only_epochs = layout(rows, ["qat.epochs"])
    assert (only_epochs.x, only_epochs.hue, only_epochs.log_x) == ("epochs", None, False)
    assert layout(rows, ["qat.lr", "quant"]).facets == ["bits"]  # bits as a category of panels


def test_compare_cli_two_sweeps_side_by_side(uri, tmp_path, capsys):
    default_like(uri, "default")
    bits_trials = [{"name": f"{b} lr=1e-3 ep=1 {m}", "bits": b, "mode": m, "ptq": p, "val": v, "test": t,
                    "params": {"quant": b}}
                   for b, p in (("w8a8", 100.0), ("w3a3", 79.1)) for m, v, t in (("static", 97.0, 98.3),
                                                                                   ("range_learning", 95.2, 96.9))]
    make_sweep(uri, "bits", {"quant": "w8a8,w3a3", "qat.range_learning": "false,true"}, bits_trials)
    out = str(tmp_path / "cmp")
    assert compare(["--tracking-uri", uri, "--sweep", "default", "--sweep", "bits", "--out", out]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("sweep "))
    assert "swept: qat.epochs, qat.lr, qat.range_learning" in header
    table_header = next(line for line in out.splitlines() if "rank" in line)
    assert table_header.split()[:7] == ["sweep", "rank", "trial", "fp32_acc", "ptq_acc", "val_acc", "test_acc"]
    with open(tmp_path / "cmp" / "default_bits.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["sweep"] for r in rows} == {"default", "bits"} and len(rows) == 12
    assert {"test_acc", "ptq_acc", "gain", "gain_is_tie"} <= set(rows[0]) and "qat_acc" not in rows[0]
    assert (tmp_path / "cmp" / "default_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    combined = trial_rows(uri, find_sweep(uri, "qat", "default")) + trial_rows(uri, find_sweep(uri, "qat", "bits"))
    lay = write_plot(combined, ["qat.epochs", "qat.lr", "qat.range_learning", "quant"], tmp_path / "p.png", "t")
    assert lay.facets[0] == "sweep"


def test_compare_refuses_a_missing_sweep_in_one_line(uri, capsys):
    default_like(uri)
    assert compare(["--tracking-uri", uri, "--sweep", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no sweep named or with run id 'nope'") and "\n" not in err


def test_recovered_fraction_arithmetic_and_its_two_percent_rule():
    import math

    from orchestrator.tracking.recovery import ptq_gap, recovered, recovery_metrics

    # perplexity (lower is better): PTQ loses 10%, QAT wins back 3/4 of it
    assert ptq_gap(4.0, 4.4, higher_is_better=False) == pytest.approx(0.10)
    assert recovered(4.0, 4.4, 4.1, higher_is_better=False) == pytest.approx(0.75)
    assert recovered(4.0, 4.4, 3.9, higher_is_better=False) == pytest.approx(1.25)  # better than FP32
    assert recovered(4.0, 4.4, 4.6, higher_is_better=False) == pytest.approx(-0.5)  # worse than PTQ
    assert recovery_metrics("ppl", 4.0, 4.4, 4.1, False) == pytest.approx({"ppl_ptq_gap": 0.10, "ppl_recovered": 0.75})
    # below a 2% loss only the gap is reported: a fraction of a tiny gap is noise
    assert ptq_gap(4.0, 4.06, False) == pytest.approx(0.015) and math.isnan(recovered(4.0, 4.06, 4.0, False))
    assert recovery_metrics("ppl", 4.0, 4.06, 4.0, False) == pytest.approx({"ppl_ptq_gap": 0.015})
    assert recovered(4.0, 4.08, 4.04, False) == pytest.approx(0.5)  # exactly 2%: reported
    assert math.isnan(recovered(4.0, 3.5, 3.6, False))  # PTQ better than FP32: no loss to recover
    # accuracy (higher is better): the same formula, the gap in the metric's own direction
    assert ptq_gap(95.0, 85.5, higher_is_better=True) == pytest.approx(0.10)
    assert recovered(95.0, 85.5, 93.0, higher_is_better=True) == pytest.approx(7.5 / 9.5)


def test_compare_shows_the_recovered_fraction_of_a_perplexity_sweep(uri, tmp_path, capsys):
    c = MlflowClient(uri)
    exp = ensure_experiment(uri, "qat")
    parent = c.create_run(exp, run_name="sweep llm", tags={"qat.kind": "sweep", "qat.sweep_name": "llm"})
    c.log_batch(parent.info.run_id, params=[Param("space.quant", "w2g32,w4g128"), Param("sweep.metric", "val_ppl"),
                                            Param("sweep.mode", "min"), Param("sweep.tie_on_samples", "False")])
    for name, ptq, val, test in (("w2g32 lr=1e-3 ep=2 RL", 4.4, 4.15, 4.1), ("w4g128 lr=1e-3 ep=2 RL", 4.04, 4.0, 4.02)):
        run = c.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id, "qat.kind": "trial",
                                                     "qat.bits": name.split()[0], "qat.outcome": "finished"})
        metrics = {"fp32_ppl": 4.0, "ptq_ppl": ptq, "val_ppl": val, "test_ppl": test}
        c.log_batch(run.info.run_id, params=[Param("qat.lr", "0.001"), Param("qat.epochs", "2"),
                                             Param("quant", name.split()[0])],
                    metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        c.set_terminated(run.info.run_id)
    c.set_terminated(parent.info.run_id)
    assert compare(["--tracking-uri", uri, "--sweep", "llm", "--out", str(tmp_path / "cmp")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "rank" in line).split()
    assert header[header.index("gain") + 1] == "recovered"
    w2, w4 = (next(line.split() for line in lines if line.split()[1:2] == [b]) for b in ("w2g32", "w4g128"))
    assert w4[0] == "1" and w2[0] == "2"  # ranked by val_ppl, lowest first
    assert w2[-3] == "75%"  # (4.4 - 4.1) / (4.4 - 4.0); the last columns: recovered, outcome, wall s
    assert w4[-3] == "-"  # PTQ lost 1%: no fraction
    with open(tmp_path / "cmp" / "llm.csv") as f:
        rows = {r["name"].split()[0]: r for r in csv.DictReader(f)}
    assert float(rows["w2g32"]["ppl_recovered"]) == pytest.approx(0.75)
    assert float(rows["w4g128"]["ppl_ptq_gap"]) == pytest.approx(0.01) and rows["w4g128"]["ppl_recovered"] == "nan"
