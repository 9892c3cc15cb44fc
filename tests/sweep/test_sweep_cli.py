"""qat-sweep and qat-compare for real: local Ray cluster, SQLite MLflow, subprocesses like a user runs them."""

from __future__ import annotations

import csv
import json
import os
import signal
import time

import pytest
from helpers_cli import run_cli, start_cli
from mlflow import MlflowClient

FOUR_TRIALS = ["sweep.space.qat.lr.grid=[0.001,0.0003]", "sweep.space.qat.epochs.grid=[1]",
               "sweep.space.qat.range_learning.grid=[false,true]", "trainer.num_workers=2"]


def children_of(uri: str, sweep_name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("qat")
    (parent,) = client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.`qat.kind` = 'sweep' and tags.`qat.sweep_name` = '{sweep_name}'")
    kids = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, kids


@pytest.fixture(scope="module")
def four_trial_sweep(tmp_path_factory, baseline_cache):
    root = tmp_path_factory.mktemp("sweep4")
    proc = run_cli("qat-sweep", [f"paths.root={root}", "sweep.name=four", *FOUR_TRIALS], root, baseline_cache)
    return root, proc


def test_four_trial_sweep_lands_in_mlflow(four_trial_sweep):
    root, proc = four_trial_sweep
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client, parent, kids = children_of(uri, "four")
    assert parent.info.status == "FINISHED"
    assert len(kids) == 4 and {k.info.status for k in kids} == {"FINISHED"}
    points = {(k.data.params["qat.lr"], k.data.params["qat.range_learning"]) for k in kids}
    assert points == {("0.001", "False"), ("0.001", "True"), ("0.0003", "False"), ("0.0003", "True")}
    for k in kids:
        for key in ("fp32_acc", "ptq_acc", "train_loss", "val_acc", "lr", "epoch_time_s", "samples_per_s", "test_acc"):
            assert key in k.data.metrics, (k.info.run_name, key)
        assert k.data.params["trainer.num_workers"] == "2"
        local = client.download_artifacts(k.info.run_id, "export/model.encodings", str(root / "dl" / k.info.run_id))
        assert json.loads(open(local).read())["version"] == "1.0.0"
    # the end-of-sweep table and the best trial's export directory
    assert "sweep four: 4 trial(s), sorted by val_acc" in proc.stdout
    best_line = next(line for line in proc.stdout.splitlines() if line.startswith("best trial:"))
    export_dir = best_line.rsplit("export in ", 1)[1].strip()
    assert sorted(os.listdir(export_dir)) == ["model.encodings", "model.onnx", "model.pth"]


def test_compare_matches_mlflow(four_trial_sweep, baseline_cache):
    root, _ = four_trial_sweep
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "cmp"
    proc = run_cli("qat-compare", ["--tracking-uri", uri, "--sweep", "four", "--out", str(out),
                                   "--export-best", str(root / "best")], root, baseline_cache)
    client, parent, kids = children_of(uri, "four")
    with open(out / "four.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    by_id = {k.info.run_id: k for k in kids}
    for row in rows:
        run = by_id[row["run_id"]]
        assert float(row["qat_acc"]) == pytest.approx(run.data.metrics["test_acc"])
        assert float(row["fp32_acc"]) == pytest.approx(run.data.metrics["fp32_acc"])
        assert float(row["ptq_acc"]) == pytest.approx(run.data.metrics["ptq_acc"])
        assert float(row["val_acc"]) == pytest.approx(run.data.metrics["val_acc"])
        assert float(row["delta"]) == pytest.approx(run.data.metrics["test_acc"] - run.data.metrics["fp32_acc"])
        assert float(row["lr"]) == float(run.data.params["qat.lr"])
        assert row["mode"] == run.data.tags["qat.mode"] and row["bits"] == "W4A4"
    best_val = max(k.data.metrics["val_acc"] for k in kids)
    assert float(rows[0]["val_acc"]) == best_val  # ranked by the sweep's metric
    assert (out / "four.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(root / "best" / "export")) == ["model.encodings", "model.onnx", "model.pth"]
    assert rows[0]["name"].split(" ")[0] in proc.stdout


@pytest.mark.slow
def test_killed_sweep_resumes_without_duplicates(tmp_path, baseline_cache):
    args = [f"paths.root={tmp_path}", "sweep.name=resumable", *FOUR_TRIALS]
    proc = start_cli("qat-sweep", args, tmp_path, baseline_cache, tmp_path / "first.log")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill the driver once at least one trial has finished
        time.sleep(2)
        # The driver's progress line first: opening the database while the driver still creates its
        # schema would race two Alembic migrations on one SQLite file.
        if "finished: test_acc" not in (tmp_path / "first.log").read_text():
            continue
        _, _, kids = children_of(uri, "resumable")
        if any(k.info.status == "FINISHED" for k in kids):
            break
    else:
        pytest.fail("no trial finished within 300 s:\n" + (tmp_path / "first.log").read_text()[-3000:])
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, abruptly
    proc.wait()
    _, _, before = children_of(uri, "resumable")
    finished_before = {k.info.run_id: k.info.start_time for k in before if k.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 4

    rerun = run_cli("qat-sweep", [*args, "sweep.resume=true"], tmp_path, baseline_cache)
    client, parent, kids = children_of(uri, "resumable")
    assert len(kids) == 4, [k.info.run_name for k in kids]
    assert len({k.data.tags["qat.trial_id"] for k in kids}) == 4
    assert {k.info.status for k in kids} == {"FINISHED"}
    for k in kids:
        if k.info.run_id in finished_before:  # not rerun
            assert k.info.start_time == finished_before[k.info.run_id]
        assert [m.step for m in client.get_metric_history(k.info.run_id, "val_acc")].count(0) == 1
    assert "sweep resumable: 4 trial(s)" in rerun.stdout


def test_eight_concurrent_trials_lose_no_metric(tmp_path, baseline_cache):
    lrs = "[0.002,0.001,0.0007,0.0005,0.0003,0.0002,0.0001,0.00005]"
    run_cli("qat-sweep", [f"paths.root={tmp_path}", "sweep.name=eight", "trainer=local", "trainer.cpus_per_worker=0.25",
                          "sweep.max_concurrent_trials=8", f"sweep.space.qat.lr.grid={lrs}",
                          "sweep.space.qat.epochs.grid=[2]", "sweep.space.qat.range_learning.grid=[true]"],
            tmp_path, baseline_cache)
    client, parent, kids = children_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "eight")
    assert len(kids) == 8
    for k in kids:
        for key in ("train_loss", "val_acc", "lr", "epoch_time_s", "samples_per_s"):
            assert [m.step for m in client.get_metric_history(k.info.run_id, key)] == [0, 1], (k.info.run_name, key)
        for key in ("fp32_acc", "ptq_acc", "test_acc"):
            assert key in k.data.metrics
        assert {a.path for a in client.list_artifacts(k.info.run_id, "export")} == {
            "export/model.pth", "export/model.onnx", "export/model.encodings"}


def test_bad_override_fails_fast_with_one_line_and_writes_nothing(tmp_path, baseline_cache):
    for override, message in [("quant.param_bw=0", "error: quant.param_bw=0 is not a supported bit width; allowed: "
                                                    "an integer from 2 to 16"),
                              ("sweep.space.qat.lr.grid=[0.1,-1]", "error: sweep point (qat.lr=-1"),
                              ("sweep.scheduler=hyperband", "error: sweep.scheduler='hyperband' is not allowed; "
                                                            "allowed: none, asha")]:
        start = time.time()
        proc = run_cli("qat-sweep", [f"paths.root={tmp_path / 'out'}", override], tmp_path, baseline_cache,
                       check=False)
        elapsed = time.time() - start
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith(message), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
        assert elapsed < 5.0, elapsed
    assert os.listdir(tmp_path) == []  # nothing written


def test_resuming_a_sweep_that_does_not_exist_and_reusing_a_name_are_refused(four_trial_sweep, baseline_cache):
    root, _ = four_trial_sweep
    proc = run_cli("qat-sweep", [f"paths.root={root}", "sweep.name=four", *FOUR_TRIALS], root, baseline_cache,
                   check=False)
    assert proc.returncode == 2 and "sweep.name='four' already exists" in proc.stderr and "sweep.resume=true" in proc.stderr
    proc = run_cli("qat-sweep", [f"paths.root={root}", "sweep.name=never", "sweep.resume=true"], root, baseline_cache,
                   check=False)
    assert proc.returncode == 2 and "no sweep 'never'" in proc.stderr


def test_hydra_conventions(tmp_path, baseline_cache):
    help_text = run_cli("qat-sweep", ["--help"], tmp_path, baseline_cache).stdout
    assert "qat-sweep: run a quantization-aware-training sweep" in help_text and "sweep: bits, default, random, smoke" in help_text
    cfg = run_cli("qat-sweep", ["--cfg", "job", "sweep=random", "qat.lr=0.05", "quant=w4a8", "trainer.num_workers=3",
                                "tracking.experiment=other", "model.pretrain_epochs=2", "data.args.seed=7"],
                  tmp_path, baseline_cache).stdout
    for expected in ("name: random", "lr: 0.05", "param_bw: 4", "output_bw: 8", "num_workers: 3",
                     "experiment: other", "pretrain_epochs: 2", "seed: 7", "loguniform:"):
        assert expected in cfg, expected
    train_cfg = run_cli("qat-train", ["--cfg", "job", "qat=range_learning", "quant=w3a3"], tmp_path, baseline_cache).stdout
    assert "range_learning: true" in train_cfg and "param_bw: 3" in train_cfg
    assert os.listdir(tmp_path) == []
