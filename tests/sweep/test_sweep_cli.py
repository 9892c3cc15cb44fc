"""qat-sweep, qat-train -m and qat-compare for real: local Ray, SQLite MLflow, Hydra's sweep grammar,
run as a user runs them (subprocesses, output piped)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal

import pytest
from helpers_cli import run_cli, start_cli, wait_for
from helpers_sweep import sqlite, sweep_runs

NOISE = ("INFO", "WARNING", "core_worker", "raylet", "(pid=", "Tune", "tensorboard", "Configuration for experiment",
         "Downloading artifacts", "A new study", "Traceback", "token")


@pytest.fixture(scope="module")
def hydra_sweep(tmp_path_factory, baseline_cache):
    """``qat-train -m`` with Hydra's choice/interval grammar: 2 bit widths x 2 log-uniform lr draws."""
    root = tmp_path_factory.mktemp("hydra-sweep")
    proc = run_cli("qat-train", ["-m", f"paths.root={root}", "sweep.name=hydra", "quant=choice(w8a8,w4a4)",
                                 "qat.lr=tag(log,interval(1e-4,1e-2))", "qat.epochs=2", "sweep.num_samples=2"],
                   root, baseline_cache)
    return root, proc


def test_hydra_multirun_is_one_tune_sweep_with_one_parent(hydra_sweep):
    root, proc = hydra_sweep
    client, parent, kids = sweep_runs(sqlite(root), "hydra")
    assert parent.info.status == "FINISHED" and len(kids) == 4
    assert sorted(k.data.params["quant"] for k in kids) == ["w4a4", "w4a4", "w8a8", "w8a8"]
    lrs = {float(k.data.params["qat.lr"]) for k in kids}
    assert len(lrs) == 4 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    for k in kids:
        bits = k.data.params["quant"]
        assert k.data.tags["qat.bits"] == bits and k.data.params["quant.param_bw"] == bits[1]
        assert re.fullmatch(rf"{bits} lr=\S+ ep=2 static #[1-4]", k.info.run_name), k.info.run_name
        assert k.data.tags["qat.launcher"] == "tune-actor" and k.data.tags["qat.outcome"] == "finished"
    assert parent.data.params["space.quant"] == "w8a8,w4a4"
    assert parent.data.params["space.qat.lr"] == "tag(log,interval(0.0001,0.01))"
    assert not (root / "multirun").exists() and sorted(os.listdir(root)) == ["mlartifacts", "mlflow.db", "sweeps"]


def test_trial_runs_read_well_in_mlflow(hydra_sweep, tmp_path):
    root, _ = hydra_sweep
    client, parent, kids = sweep_runs(sqlite(root), "hydra")
    for k in kids:
        params, tags, rid = k.data.params, k.data.tags, k.info.run_id
        assert len(params) <= 25 and not any(v.startswith("/") for v in params.values()), params
        assert not {"output_dir", "tracking.trial_id", "tracking.run_name", "tracking.uri"} & set(params)
        assert tags["qat.output_dir"].startswith(str(root)) and tags["qat.trial_id"].startswith("hydra-")
        assert tags["mlflow.source.name"] == "qat-train" and tags["qat.command"].startswith("qat-train -m ")
        assert tags["mlflow.user"]
        assert len(tags["mlflow.source.git.commit"]) == 40
        for key in ("fp32_acc", "ptq_acc", "test_acc", "startup_s"):
            assert len(client.get_metric_history(rid, key)) == 1, key  # one-off metrics, once
        for key in ("val_acc", "train_loss", "lr"):
            assert [m.step for m in client.get_metric_history(rid, key)] == [0, 1], key
        assert any(m.startswith("system/cpu_utilization") for m in k.data.metrics)
        dl = tmp_path / rid
        encodings = json.loads(open(client.download_artifacts(rid, "export/model.encodings", str(dl))).read())
        as_json = json.loads(open(client.download_artifacts(rid, "export/model.encodings.json", str(dl))).read())
        assert as_json == encodings and encodings["version"] == "1.0.0"
        summary = open(client.download_artifacts(rid, "summary.txt", str(dl))).read()
        assert "Weights (" in summary and "Activations (" in summary and len(summary.splitlines()) > 5
    best = max((k for k in kids), key=lambda k: (k.data.metrics["val_acc"], k.data.metrics["test_acc"]))
    assert parent.data.metrics["best_val_acc"] == best.data.metrics["val_acc"]
    by_id = {k.info.run_id: k for k in kids}
    chosen = by_id[parent.data.tags["best_run_id"]]  # the collapsed parent row shows the best trial's numbers
    assert all(parent.data.metrics[k] == chosen.data.metrics[k] for k in ("fp32_acc", "ptq_acc", "val_acc", "test_acc"))
    assert by_id[parent.data.tags["best_run_id"]].data.metrics["val_acc"] == best.data.metrics["val_acc"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} == {
        "comparison/hydra.csv", "comparison/hydra.png"}


def test_the_best_trial_is_registered_with_its_encodings(hydra_sweep, tmp_path):
    root, proc = hydra_sweep
    client, parent, _ = sweep_runs(sqlite(root), "hydra")
    (version,) = client.search_model_versions("name = 'mnist1d_cnn-mnist1d-qat'")
    assert version.run_id == parent.data.tags["best_run_id"] and version.status == "READY"
    assert version.tags["sweep"] == "hydra"
    import mlflow

    mlflow.set_tracking_uri(sqlite(root))
    local = mlflow.artifacts.download_artifacts(f"models:/mnist1d_cnn-mnist1d-qat/{version.version}",
                                                dst_path=str(tmp_path / "model"))
    files = set(os.listdir(local))
    assert {"MLmodel", "model.onnx", "model.encodings", "model.encodings.json", "model.pth"} <= files
    model = mlflow.pyfunc.load_model(f"models:/mnist1d_cnn-mnist1d-qat/{version.version}")
    assert "onnx" in model.metadata.flavors
    assert "registered: models:/mnist1d_cnn-mnist1d-qat/1" in proc.stdout


def test_console_is_one_quiet_line_per_event(hydra_sweep):
    _, proc = hydra_sweep
    lines = proc.stdout.splitlines()
    assert "\x1b[" not in proc.stdout and "\x1b[" not in proc.stderr  # piped: no colour codes
    assert proc.stderr.strip() == "", proc.stderr[-2000:]
    assert [line for line in lines if any(n in line for n in NOISE)] == []
    events = [line for line in lines if re.match(r"\[\s*\d+s\]", line)]
    assert len(events) == len(set(events)) and len(events) == 4 * (1 + 2 + 1)  # start, 2 epochs, finish
    assert sum("Ray dashboard: http://127.0.0.1:" in line for line in lines) == 2  # at start and at the end
    ui = [line for line in lines if "mlflow ui --backend-store-uri sqlite:///" in line]
    assert len(ui) == 2 and all("#/experiments/1/runs?workflowType=machine_learning" in line for line in ui)


def test_compare_reads_the_sweep_from_mlflow(hydra_sweep, baseline_cache):
    root, _ = hydra_sweep
    out = root / "cmp"
    proc = run_cli("qat-compare", ["--tracking-uri", sqlite(root), "--sweep", "hydra", "--out", str(out),
                                   "--export-best", str(root / "best")], root, baseline_cache)
    client, parent, kids = sweep_runs(sqlite(root), "hydra")
    with open(out / "hydra.csv") as f:
        rows = list(csv.DictReader(f))
    by_id = {k.info.run_id: k for k in kids}
    assert len(rows) == 4 and rows[0]["run_id"] == parent.data.tags["best_run_id"]
    for row in rows:
        run = by_id[row["run_id"]]
        for key in ("fp32_acc", "ptq_acc", "val_acc", "test_acc"):
            assert float(row[key]) == pytest.approx(run.data.metrics[key])
        assert float(row["gain"]) == pytest.approx(run.data.metrics["test_acc"] - run.data.metrics["ptq_acc"])
        assert row["quant"] == run.data.params["quant"] and row["name"] == run.info.run_name
    assert "swept: qat.lr, quant" in proc.stdout
    assert sorted(os.listdir(root / "best" / "export")) == ["model.encodings", "model.encodings.json", "model.onnx",
                                                           "model.pth"]


def test_optuna_search_runs_tpe_over_the_hydra_space(tmp_path, baseline_cache):
    proc = run_cli("qat-sweep", [f"paths.root={tmp_path}", "sweep=optuna", "sweep.name=tpe", "sweep.num_samples=3",
                                 "sweep.scheduler=none", "qat.epochs=1"], tmp_path, baseline_cache)
    client, parent, kids = sweep_runs(sqlite(tmp_path), "tpe")
    assert parent.data.params["sweep.search"] == "optuna" and len(kids) == 3
    assert {k.data.tags["qat.outcome"] for k in kids} == {"finished"}
    assert list((tmp_path / "sweeps" / "tpe").glob("searcher-state-*.pkl"))  # Tune's OptunaSearch state
    assert all(1e-5 <= float(k.data.params["qat.lr"]) <= 1e-2 for k in kids)
    assert "optuna search over qat.lr (tag(log,interval(1e-05,0.01)))" in proc.stdout


def test_asha_stops_a_trailing_trial_and_labels_it(tmp_path, baseline_cache):
    # one trial at a time: the trailing learning rate (1e-6 hardly moves the model from its PTQ accuracy)
    # reaches ASHA's first rung after the good one; min_max calibration, whose PTQ (84%) static QAT
    # clears in its first epoch (sqnr's 88% it may not, and the rung then waits a round)
    proc = run_cli("qat-sweep", [f"paths.root={tmp_path}", "sweep.name=asha", "qat.lr=0.001,0.000001", "qat.epochs=3",
                                 "qat.range_learning=false", "qat.distill.enabled=false", "sweep.scheduler=asha",
                                 "sweep.max_concurrent_trials=1", "quant.quant_scheme=min_max"],
                   tmp_path, baseline_cache)
    client, parent, kids = sweep_runs(sqlite(tmp_path), "asha")
    by_lr = {float(k.data.params["qat.lr"]): k for k in kids}
    good, bad = by_lr[0.001], by_lr[1e-6]
    assert good.data.tags["qat.outcome"] == "finished" and "test_acc" in good.data.metrics
    assert bad.info.status == "FINISHED" and bad.data.tags["qat.outcome"] == "stopped_by_scheduler"
    assert bad.data.tags["qat.stopped_at_epoch"] == "0" and "test_acc" not in bad.data.metrics
    assert re.search(r"stopped\s+w4a4 lr=1e-6 ep=3 static  by asha after epoch 1", proc.stdout), proc.stdout


@pytest.mark.slow
def test_ctrl_c_exits_130_marks_killed_and_resumes(tmp_path, baseline_cache):
    args = [f"paths.root={tmp_path}", "sweep.name=resumable", "qat.lr=0.001,0.0003", "qat.range_learning=false,true",
            "qat.epochs=2", "qat.distill.enabled=false"]
    log = tmp_path / "first.log"
    proc = start_cli("qat-sweep", args, tmp_path, baseline_cache, log)
    wait_for(log, "finished ")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    uri = sqlite(tmp_path)
    client, parent, kids = sweep_runs(uri, "resumable")
    assert parent.info.status == "KILLED" and parent.data.tags["qat.outcome"] == "interrupted"
    finished = {k.info.run_id: k.info.start_time for k in kids if k.info.status == "FINISHED"}
    assert 1 <= len(finished) < 4
    assert all(k.info.status == "KILLED" and k.data.tags["qat.outcome"] == "interrupted"
               for k in kids if k.info.run_id not in finished)
    command = text.split("resume with: ", 1)[1].splitlines()[0]
    assert command.endswith("sweep.name=resumable sweep.resume=true") and "paths.root=" in command

    rerun = run_cli("qat-sweep", command.split()[1:], tmp_path, baseline_cache)
    client, parent, kids = sweep_runs(uri, "resumable")
    assert parent.info.status == "FINISHED" and parent.data.tags["qat.outcome"] == "finished"
    assert len(kids) == 4 and len({k.data.tags["qat.trial_id"] for k in kids}) == 4
    assert {(k.info.status, k.data.tags["qat.outcome"]) for k in kids} == {("FINISHED", "finished")}
    for k in kids:
        if k.info.run_id in finished:  # not rerun
            assert k.info.start_time == finished[k.info.run_id]
        assert [m.step for m in client.get_metric_history(k.info.run_id, "val_acc")] == [0, 1]
    assert "sweep resumable: 4 trial(s)" in rerun.stdout and "(resuming)" in rerun.stdout


def test_sigterm_exits_143_and_marks_the_sweep_killed(tmp_path, baseline_cache):
    log = tmp_path / "run.log"
    proc = start_cli("qat-sweep", [f"paths.root={tmp_path}", "sweep=smoke"], tmp_path, baseline_cache, log)
    wait_for(log, "started ")
    os.kill(proc.pid, signal.SIGTERM)  # the driver only, as a scheduler or `kill` sends it
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]  # a graceful stop; slow on a loaded host
    _, parent, kids = sweep_runs(sqlite(tmp_path), "smoke")
    assert parent.info.status == "KILLED"
    assert all(k.info.status in ("KILLED", "FINISHED") for k in kids)
    assert "resume with: " in log.read_text() and "sweep.resume=true" in log.read_text()


@pytest.mark.slow
def test_multi_worker_trials_train_with_ddp_on_ray_train(tmp_path, baseline_cache):
    proc = run_cli("qat-sweep", [f"paths.root={tmp_path}", "sweep.name=ddp", "qat.range_learning=false,true",
                                 "qat.epochs=1", "qat.lr=0.001", "qat.distill.enabled=false", "trainer.num_workers=2"],
                   tmp_path, baseline_cache)
    # Ray Train's controller and workers stay quiet too (no PreemptionWatcher / raylet lines)
    assert [line for line in proc.stdout.splitlines() if any(n in line for n in NOISE)] == []
    assert proc.stderr.strip() == "", proc.stderr[-2000:]
    client, parent, kids = sweep_runs(sqlite(tmp_path), "ddp")
    assert parent.info.status == "FINISHED" and len(kids) == 2
    for k in kids:
        assert k.info.status == "FINISHED" and k.data.tags["qat.launcher"] == "ray-train"
        assert k.data.tags["qat.world_size"] == "2" and "test_acc" in k.data.metrics


def test_eight_concurrent_in_actor_trials_lose_no_metric(tmp_path, baseline_cache):
    lrs = "0.002,0.001,0.0007,0.0005,0.0003,0.0002,0.0001,0.00005"
    run_cli("qat-sweep", [f"paths.root={tmp_path}", "sweep=smoke", "sweep.name=eight", "trainer=local",
                          "trainer.cpus_per_worker=0.25", f"qat.lr={lrs}", "qat.epochs=2", "qat.range_learning=true"],
            tmp_path, baseline_cache)
    client, parent, kids = sweep_runs(sqlite(tmp_path), "eight")
    assert len(kids) == 8
    for k in kids:  # trainer=local inside a sweep trains in the Tune actor too (never Ray Train)
        assert k.data.tags["qat.launcher"] == "tune-actor" and k.data.params["trainer.num_workers"] == "0"
        for key in ("train_loss", "val_acc", "lr", "epoch_time_s", "samples_per_s"):
            assert [m.step for m in client.get_metric_history(k.info.run_id, key)] == [0, 1], (k.info.run_name, key)
        for key in ("fp32_acc", "ptq_acc", "test_acc"):
            assert key in k.data.metrics
        assert {a.path for a in client.list_artifacts(k.info.run_id, "export")} == {
            "export/model.pth", "export/model.onnx", "export/model.encodings", "export/model.encodings.json"}


def test_bad_overrides_fail_fast_with_one_line_and_write_nothing(tmp_path, baseline_cache):
    for args, message in [
        (["quant.param_bw=0"], "error: quant.param_bw=0 is not a supported bit width; allowed: an integer from 2 "
                               "to 16"),
        (["qat.lr=0.1,-1"], "error: sweep point (qat.range_learning=false, qat.distill.enabled=false, qat.lr=-1): "
                            "qat.lr=-1.0 is not allowed; allowed: a finite number in (0, 10]"),
        (["sweep.scheduler=pbt"], "error: sweep.scheduler='pbt' is not allowed; allowed: none, asha, hyperband"),
        (["sweep.metric=test_acc"], "error: sweep.metric='test_acc' is not allowed; allowed: val_acc, val_top5 (test "
                                    "metrics"),
        (["quant=w8a8,w9a9"], "error: sweep point (qat.lr=0.001, qat.range_learning=false, qat.distill.enabled=false, "
                              "quant=w9a9): In 'sweep': Could not find 'quant/w9a9'; Available options in 'quant': "
                              "fp8, mxfp4, mxfp8, nvfp4, w2a2, w2g32, w3a3"),
        (["qat.lr=interval(0.1,0.01)"], "error: qat.lr=interval(0.1,0.01): an interval needs low < high"),
    ]:
        proc = run_cli("qat-sweep", [f"paths.root={tmp_path / 'out'}", *args], tmp_path, baseline_cache, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith(message), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
    assert os.listdir(tmp_path) == []  # nothing written


def test_resuming_a_sweep_that_does_not_exist_and_reusing_a_name_are_refused(hydra_sweep, baseline_cache):
    root, _ = hydra_sweep
    proc = run_cli("qat-train", ["-m", f"paths.root={root}", "sweep.name=hydra", "qat.lr=1e-3,1e-4"], root,
                   baseline_cache, check=False)
    assert proc.returncode == 2 and "sweep.name='hydra' already exists" in proc.stderr
    assert "sweep.resume=true" in proc.stderr
    proc = run_cli("qat-sweep", [f"paths.root={root}", "sweep.name=never", "sweep.resume=true"], root, baseline_cache,
                   check=False)
    assert proc.returncode == 2 and "no sweep 'never'" in proc.stderr


def test_hydra_conventions(tmp_path, baseline_cache):
    help_text = run_cli("qat-sweep", ["--help"], tmp_path, baseline_cache).stdout
    assert "qat-sweep: run a quantization-aware-training sweep" in help_text
    assert "sweep: bits, default, distill, llm, optuna, random, smoke" in help_text
    cfg = run_cli("qat-sweep", ["--cfg", "job", "sweep=random", "qat.lr=0.05", "quant=w4a8", "trainer.num_workers=3",
                                "tracking.experiment=other", "model.pretrain_epochs=2", "data.args.seed=7"],
                  tmp_path, baseline_cache).stdout
    for expected in ("name: random", "search: random", "lr: 0.05", "param_bw: 4", "output_bw: 8", "num_workers: 3",
                     "experiment: other", "pretrain_epochs: 2", "seed: 7"):
        assert expected in cfg, expected
    hydra_cfg = run_cli("qat-sweep", ["--cfg", "hydra", "sweep=bits"], tmp_path, baseline_cache).stdout
    assert "quant: w8a8,w4a8,w4a4,w3a3" in hydra_cfg and "TuneSweeper" in hydra_cfg
    train_cfg = run_cli("qat-train", ["--cfg", "job", "qat=range_learning", "quant=w3a3"], tmp_path,
                        baseline_cache).stdout
    assert "range_learning: true" in train_cfg and "param_bw: 3" in train_cfg
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_mlflow_ui_shows_the_sweep_nested_readable_with_metric_columns(hydra_sweep, baseline_cache):
    """The real `mlflow server` UI in headless Chromium (scripts/mlflow_ui_check.py)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if not (os.environ.get("QAT_CHROMIUM") or shutil.which("chromium")):
        if os.environ.get("QAT_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required here (QAT_REQUIRE_BROWSER=1): bash scripts/setup.sh --browser")
        pytest.skip("no chromium (bash scripts/setup.sh --browser installs Debian's)")
    root, _ = hydra_sweep
    script = Path(__file__).resolve().parents[2] / "scripts" / "mlflow_ui_check.py"
    proc = subprocess.run([sys.executable, str(script), "--tracking-uri", sqlite(root), "--sweep", "hydra", "--out",
                           str(root / "ui")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok  ") == 4, proc.stdout
    assert (root / "ui" / "mlflow-runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
