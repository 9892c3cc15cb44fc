"""``qat-analyze`` through the real command line: a user's digits MLP, trained, then given a planted
fragile layer (``helpers.plant_fragile_layer``), which ranks first by output SQNR and by accuracy;
the table has one row per quantizer of the simulation a trial builds; the CSV, the plot and the
MLflow run (artifacts, table view, metrics, tags) exist; bad input is one ``error:`` line, exit 2,
nothing written."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import plant_fragile_layer, train_epochs
from helpers_cli import cli_env
from mlflow import MlflowClient

from orchestrator.quant import QuantConfig, QuantizationSimModel

BIN = Path(sys.executable).parent

MODEL = '''
    from torch import nn


    class Fragile(nn.Sequential):
        """Digits [N, 1, 8, 8] -> flattened -> 32 -> 32 -> 10 classes."""

        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 10))
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_data):
    """A user's package holding the model class, and its weights: trained on the digits, then
    layer ``3`` made fragile (its float function is unchanged but for one hidden unit)."""
    root = tmp_path_factory.mktemp("analyze-project")
    (root / "src" / "analyzepkg").mkdir(parents=True)
    (root / "src" / "analyzepkg" / "__init__.py").write_text("")
    (root / "src" / "analyzepkg" / "models.py").write_text(textwrap.dedent(MODEL))
    model = _model_class(root)()
    torch.manual_seed(0)
    train_epochs(model, digits_data.train, epochs=10, lr=3e-3)
    plant_fragile_layer(model[1], model[3])
    torch.save(model.state_dict(), root / "fragile.pt")
    return root


def _model_class(root: Path) -> type:
    sys.path.insert(0, str(root / "src"))
    try:
        from analyzepkg.models import Fragile
    finally:
        sys.path.remove(str(root / "src"))
    return Fragile


def analyze(project: Path, cache: str, *args: str, root: str = "out") -> subprocess.CompletedProcess:
    env = {**cli_env(cache), "PYTHONPATH": str(project / "src")}
    return subprocess.run([str(BIN / "qat-analyze"), "model=custom", "model._target_=analyzepkg.models.Fragile",
                           f"model.checkpoint={project / 'fragile.pt'}", "data=digits", "quant=w4a8",
                           "qat.calibration_batches=2", f"paths.root={project / root}", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_the_planted_fragile_layer_ranks_first_in_the_table_csv_plot_and_mlflow(project, baseline_cache):
    proc = analyze(project, baseline_cache, "name=fragile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = project / "out" / "analyze" / "fragile"
    with open(out / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # one row per quantizer of the simulation the trial builds (the same model and settings)
    sim = QuantizationSimModel(_model(project), torch.zeros(2, 1, 8, 8),
                               QuantConfig(param_bw=4, output_bw=8))
    expected = set(sim.quantized_params()) | set(sim.activation_quantizers())
    assert sorted(r["quantizer"] for r in rows) == sorted(expected)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    top = rows[0]
    assert (top["quantizer"], top["kind"], top["bits"], top["elements"]) == ("3.weight", "weight", "4", "1024")
    only_on = [float(r["only_on_sqnr_db"]) for r in rows]
    assert only_on == sorted(only_on)
    other_weights = [float(r["only_on_sqnr_db"]) for r in rows[1:] if r["kind"] == "weight"]
    assert only_on[0] < min(other_weights) - 10  # by far the worst weight alone
    assert float(top["all_but_sqnr_db"]) == max(float(r["all_but_sqnr_db"]) for r in rows)
    # the console: the ranked table, most sensitive first, and where everything went
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("quantizer"))
    assert lines[header + 1].split()[:3] == ["3.weight", "weight", "4"]
    assert len([line for line in lines[header + 1:] if line.split()[:1] and line.split()[0] in expected]) == len(rows)
    assert f"csv: {out / 'sensitivity.csv'}" in lines and f"plot: {out / 'sensitivity.png'}" in lines
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # MLflow: one finished analysis run with the files, the table view, metrics and the top names
    client = MlflowClient(f"sqlite:///{project / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qat").experiment_id],
                              filter_string="tags.`qat.kind` = 'analysis'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "fragile"
    assert run.data.tags["qat.outcome"] == "finished"
    assert run.data.tags["qat.most_sensitive"].split(",")[0] == "3.weight"
    assert run.data.tags["qat.command"].startswith("qat-analyze ")
    assert run.data.params["analyze.metric"] == "sqnr" and run.data.params["quant.param_bw"] == "4"
    m = run.data.metrics
    assert m["quantizers"] == len(rows) and 0 <= m["fp32_acc"] <= 100 and 0 <= m["ptq_acc"] <= 100
    assert abs(m["ptq_sqnr_db"] - float(top["only_on_sqnr_db"])) < 3  # the fragile layer's noise dominates
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert artifacts == {"analysis/sensitivity.csv", "analysis/sensitivity.png", "analysis/sensitivity_table.json"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "analysis/sensitivity_table.json",
                                                      str(project / "dl"))).read_text())
    assert table["columns"][:2] == ["rank", "quantizer"] and table["data"][0][1] == "3.weight"
    assert len(table["data"]) == len(rows)


def _model(project: Path) -> torch.nn.Module:
    model = _model_class(project)()
    model.load_state_dict(torch.load(project / "fragile.pt"))
    return model.eval()


@pytest.mark.slow
def test_accuracy_ranks_it_first_too(project, baseline_cache):
    proc = analyze(project, baseline_cache, "name=by-acc", "analyze.metric=acc", "analyze.split=test")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(project / "out" / "analyze" / "by-acc" / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["quantizer"] == "3.weight" and list(rows[0])[-2:] == ["only_on_acc", "all_but_acc"]
    fp32 = float(re.search(r"^FP32 acc ([0-9.]+)%", proc.stdout, re.M)[1])
    assert fp32 > 85  # a trained model ...
    assert float(rows[0]["only_on_acc"]) < fp32 - 20  # ... that its fragile layer alone ruins
    assert all(float(r["only_on_acc"]) > fp32 - 5 for r in rows[1:] if r["kind"] == "weight")  # no other weight


@pytest.mark.parametrize("arg, message", [
    ("analyze.metric=bogus", "error: analyze.metric='bogus' is not allowed; allowed: sqnr, acc, top5 "),
    ("analyze.bogus=1", "error: Could not override 'analyze.bogus'."),
    ("analyze.split=train", "error: analyze.split='train' is not allowed; allowed: val, test"),
    ("name=../escaped", "error: name='../escaped' is not allowed; allowed: letters, digits and _ . , : = + - (one "
                        "directory name under paths.root/analyze)"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(project, baseline_cache, arg, message):
    proc = analyze(project, baseline_cache, *(["name=bad"] if not arg.startswith("name=") else []), arg, root="bad-out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (project / "bad-out").exists()
