"""A run is its config (issue 17), through the real command line: a resume or rerun of another
config is refused before anything runs; SIGTERM ends a run as Ctrl-C does, in training and in
export; broken data is refused before any metric; one sweep per name at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_cli import cli_env, run_cli, running, wait_for
from mlflow import MlflowClient

from orchestrator.train.config import TrialConfig
from orchestrator.train.identity import IDENTITY_FILE, RunIdentity, differences, run_identity

DIGITS = ["model=digits_cnn", "data=digits", "model.pretrain_epochs=15", "trainer=local"]
HERE = Path(__file__).resolve().parent


def _runs(root: Path):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_the_fingerprint_follows_the_deciding_keys_only(tmp_path):
    base = TrialConfig()
    same = TrialConfig(output_dir=str(tmp_path / "elsewhere"))
    same.tracking.uri, same.data.loader_workers, same.qat.restart = "sqlite:///x.db", 3, True
    assert run_identity(base).fingerprint == run_identity(same).fingerprint  # paths, tracking, loaders
    other = TrialConfig()
    other.quant.param_bw = 4
    changed = run_identity(other)
    assert changed.fingerprint != run_identity(base).fingerprint
    assert differences(run_identity(base).config, changed.config) == "quant.param_bw: 8 -> 4"
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"a")
    a = TrialConfig()
    a.model.checkpoint = str(ckpt)
    first = run_identity(a)
    ckpt.write_bytes(b"b")  # the same path, other weights
    os.utime(ckpt, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert run_identity(a).fingerprint != first.fingerprint
    assert RunIdentity.from_dict(first.to_dict()).fingerprint == first.fingerprint


def test_a_killed_run_resumed_with_another_config_is_refused_then_resumes_as_it_was(tmp_path, baseline_cache):
    root = tmp_path / "out"
    args = [f"paths.root={root}", *DIGITS, "qat.epochs=3", "name=r3"]
    log = tmp_path / "first.log"
    with running("qat-train", args, tmp_path, baseline_cache, log) as proc:
        wait_for(log, "epoch 1/3", proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: what a lost node or the OOM killer does
        proc.wait(timeout=60)
    identity = json.loads((root / "train" / "r3" / IDENTITY_FILE).read_text())

    changed = run_cli("qat-train", [*args, "quant=w4a4"], tmp_path, baseline_cache, check=False)
    assert changed.returncode == 2, changed.stdout[-2000:] + changed.stderr[-2000:]
    (line,) = _error_lines(changed.stderr)
    assert "run 'r3'" in line and "quant.param_bw: 8 -> 4" in line and "quant.output_bw: 8 -> 4" in line
    assert "name=..." in line and "qat.restart=true" in line
    assert "resumed" not in changed.stdout and "epoch" not in changed.stdout  # nothing ran
    assert json.loads((root / "train" / "r3" / IDENTITY_FILE).read_text()) == identity

    resumed = run_cli("qat-train", args, tmp_path, baseline_cache)
    assert "resumed from the checkpoint of epoch" in resumed.stdout and "PTQ W8A8" in resumed.stdout
    encodings = json.loads((root / "train" / "r3" / "export" / "model.encodings").read_text())
    assert {e["bw"] for e in encodings["activation_encodings"]} == {8}

    # a finished run: a changed rerun is refused, the same one reports its own numbers again
    rerun = run_cli("qat-train", [*args[:-1], "qat.lr=0.5", "name=r3"], tmp_path, baseline_cache, check=False)
    assert rerun.returncode == 2 and "qat.lr: 0.001 -> 0.5" in rerun.stderr, rerun.stderr
    again = run_cli("qat-train", args, tmp_path, baseline_cache)
    assert "already ended (finished) with this same config" in again.stdout
    test_acc = [ln for ln in resumed.stdout.splitlines() if ln.startswith("QAT 3 epoch(s)")]
    assert test_acc and test_acc == [ln for ln in again.stdout.splitlines() if ln.startswith("QAT 3 epoch(s)")]

    # qat.restart archives the old outputs and MLflow run, then runs the new config
    restarted = run_cli("qat-train", [*args[:-2], "qat.epochs=1", "name=r3", "quant=w4a4", "qat.restart=true"],
                        tmp_path, baseline_cache)
    assert "PTQ W4A4" in restarted.stdout
    archived = [p for p in (root / "train").iterdir() if p.name.startswith("r3.archived-")]
    assert len(archived) == 1 and (archived[0] / "export" / "model.encodings").is_file()
    runs = _runs(root)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["qat.trial_id"] for r in runs}) == 2
    assert len({r.data.tags["qat.fingerprint"] for r in runs}) == 2


def test_sigterm_in_training_ends_like_ctrl_c(tmp_path, baseline_cache):
    root = tmp_path / "out"
    log = tmp_path / "run.log"
    with running("qat-train", [f"paths.root={root}", *DIGITS, "qat.epochs=20", "name=t"], tmp_path,
                 baseline_cache, log) as proc:
        wait_for(log, "epoch 1/20", proc=proc)
        os.kill(proc.pid, signal.SIGTERM)  # the program only, as `timeout`, SLURM or Kubernetes send it
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    (line,) = _error_lines(log.read_text())
    assert "interrupted (SIGTERM)" in line and "run the same command again to resume" in line
    (run,) = _runs(root)
    assert run.info.status == "KILLED" and run.data.tags["qat.outcome"] == "interrupted"
    assert run.data.tags["qat.failure_reason"] == "interrupted (SIGTERM)"


def test_sigterm_in_export_leaves_no_staging_directory(tmp_path, baseline_cache):
    root = tmp_path / "out"
    export = root / "train" / "x" / "export"
    log = tmp_path / "run.log"
    with running("qat-train", [f"paths.root={root}", *DIGITS, "qat.epochs=1", "name=x"], tmp_path,
                 baseline_cache, log) as proc:
        deadline = time.time() + 600
        while not (export.is_dir() and any(p.name.startswith(".model.export-") for p in export.iterdir())):
            assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGTERM)  # while the export is being staged
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert len(_error_lines(log.read_text())) == 1
    assert not [p.name for p in export.iterdir() if p.name.startswith(".")]
    (run,) = _runs(root)
    assert run.info.status == "KILLED" and run.data.tags["qat.failure_reason"] == "interrupted (SIGTERM)"


def test_a_staging_directory_left_by_a_killed_process_is_removed_by_the_next_export(tmp_path):
    import socket

    from orchestrator.quant.export import remove_stale_staging

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".model.export-{dead.pid}@{host}-abc123"
    alive = tmp_path / f".model.export-{os.getpid()}@{host}-def456"
    foreign = tmp_path / f".model.export-{dead.pid}@another-host-ghi789"
    for d in (stale, alive, foreign):
        d.mkdir()
    remove_stale_staging(tmp_path, "model")
    assert not stale.exists() and alive.exists() and foreign.exists()


@pytest.mark.parametrize("builder,message", [
    ("digits_empty_val", "error: data: the val split has no samples"),
    ("digits_label_12", "error: data: sample 300 of the test split has target 12, which names no output of the model "
                        "(allowed: 0-9)"),
    ("digits_rgb", "error: data: the model rejects the first batch of the train split (samples 0-1): RuntimeError: "),
])
def test_broken_data_is_refused_before_any_metric_or_run(tmp_path, baseline_cache, builder, message):
    root = tmp_path / "out"
    env = {**cli_env(baseline_cache), "PYTHONPATH": str(HERE)}
    proc = subprocess.run([str(Path(sys.executable).parent / "qat-train"), f"paths.root={root}", *DIGITS,
                           f"data._target_=user_code.{builder}", "data.name=user"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "FP32" not in proc.stdout and "baseline" not in proc.stdout  # nothing measured, nothing trained
    assert not (root / "mlflow.db").exists() and not (root / "train").exists()
