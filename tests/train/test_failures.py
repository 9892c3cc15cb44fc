"""Failures end clean: planted checkpoints are refused, a full disk and an MLflow outage are met
with one line and honest MLflow states, the local Ray token is private."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers_trial import trial_config
from mlflow import MlflowClient

from orchestrator.train.identity import run_identity, write_identity
from orchestrator.train.launcher import TrialFailed, run_trial
from orchestrator.train.session import CheckpointRefused, LocalSession, newest_state_in

MARKER = "/tmp/qat-planted-pickle-ran"


class Planted:
    """Unpickling this runs a shell command: what an attacker would write on shared storage."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _plant(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "model": Planted()}, path)


def _runs(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("qat")
    return client.search_runs([exp.experiment_id])


def test_a_planted_pickle_is_refused_on_both_checkpoint_paths(tmp_path):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    local = tmp_path / "checkpoints"
    _plant(local / "epoch_0000.pt")
    with pytest.raises(CheckpointRefused, match=r"epoch_0000.pt was refused: it asks to import and call Python "
                                                r"objects \(.*posix.system"):
        LocalSession(local).load_state()
    ray_storage = tmp_path / "ray" / "trial-x"  # Ray Train's layout: <storage>/<run>/checkpoint_*/trial_state.pt
    _plant(ray_storage / "checkpoint_2026-12-04_00-00-00.000000" / "trial_state.pt")
    with pytest.raises(CheckpointRefused, match=r"trial_state.pt was refused"):
        newest_state_in(str(ray_storage))
    assert not os.path.exists(MARKER)  # the code never ran


def test_a_torn_checkpoint_is_skipped_for_the_one_before(tmp_path):
    session = LocalSession(tmp_path, keep=3)
    session.report({}, {"epoch": 0, "history": []})
    (tmp_path / "epoch_0001.pt").write_bytes(b"PK\x03\x04 torn upload")
    assert session.load_state()["epoch"] == 0


def test_a_trial_resuming_from_a_planted_checkpoint_fails_with_the_reason_in_mlflow(tmp_path, baseline_cache):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 1})
    # the planted file sits beside this run's own identity (whoever can write one can write the other)
    write_identity(tmp_path / "trial", run_identity(cfg))
    _plant(tmp_path / "trial" / "checkpoints" / "epoch_0000.pt")
    with pytest.raises(TrialFailed, match="was refused: it asks to import and call Python objects"):
        run_trial(cfg)
    assert not os.path.exists(MARKER)
    (run,) = _runs(cfg.tracking.uri)
    assert run.info.status == "FAILED" and run.data.tags["qat.outcome"] == "failed"
    assert "CheckpointRefused" in run.data.tags["qat.failure_reason"]


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs: the first checkpoint fills it."""
    where = tmp_path / "tiny"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_fails_the_trial_with_the_reason_and_leaves_no_run_running(tmp_path, tiny_filesystem,
                                                                              baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 2})
    cfg.output_dir = str(tiny_filesystem / "trial")  # MLflow stays on the roomy disk, in tmp_path
    with pytest.raises(TrialFailed, match=r"No space left on device: cannot write .*epoch_0000.pt"):
        run_trial(cfg)
    (run,) = _runs(cfg.tracking.uri)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["qat.failure_reason"]
    assert not list(Path(cfg.output_dir).rglob(".*.tmp"))  # no half-written checkpoint left behind


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow(db: Path, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{db}",
                             "--artifacts-destination", str(artifacts), "--workers", "1"],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"mlflow server did not start:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_an_mlflow_outage_during_training_loses_nothing_and_kills_nothing(tmp_path, baseline_cache, monkeypatch):
    """The server dies after the first epoch's metrics and comes back seconds later; MLflow's own
    retries are off (as if the outage outlasted their ~250 s), so only our background retry carries
    the writes through. Every metric lands once, in order, and the trial finishes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port, db, artifacts, log = _free_port(), tmp_path / "m.db", tmp_path / "art", tmp_path / "server.log"
    server = {"proc": _start_mlflow(db, artifacts, port, log)}
    uri = f"http://127.0.0.1:{port}"
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 20,
                                                     "tracking.uri": uri, "tracking.log_artifacts": False})
    outage: dict[str, float] = {}

    def break_and_mend() -> None:
        client = MlflowClient(uri)
        while True:  # the trial's first epoch is in MLflow
            exp = client.get_experiment_by_name("qat")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and client.get_metric_history(runs[0].info.run_id, "val_acc"):
                break
            time.sleep(0.2)
        _stop(server["proc"])
        outage["start"] = time.time()
        time.sleep(4.0)
        server["proc"] = _start_mlflow(db, artifacts, port, log)
        outage["end"] = time.time()

    helper = threading.Thread(target=break_and_mend, daemon=True)
    helper.start()
    try:
        result = run_trial(cfg)
        helper.join(timeout=120)
        assert outage.get("end"), "the outage never happened"
        assert result.metrics["status"] == "finished"
        client = MlflowClient(uri)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["qat.outcome"] == "finished"
        for key in ("train_loss", "val_acc", "lr", "epoch_time_s"):
            history = client.get_metric_history(result.run_id, key)
            assert [m.step for m in history] == list(range(20)), key  # each epoch once: no gap, no duplicate
            stamps = [m.timestamp for m in history]
            assert stamps == sorted(stamps), key
        during = [m for m in client.get_metric_history(result.run_id, "val_acc")
                  if outage["start"] <= m.timestamp / 1000 <= outage["end"]]
        assert during, "no epoch ended while the server was down"  # logged while it was, landed after
        assert len(client.get_metric_history(result.run_id, "test_acc")) == 1
    finally:
        _stop(server["proc"])


def test_a_local_rays_token_file_is_private(tmp_path, monkeypatch):
    from orchestrator.train.ray_launcher import secure_local_token

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    token = tmp_path / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    secure_local_token()  # missing: created 0600
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    token.chmod(0o644)  # as `ray get-auth-token --generate` writes it under the usual umask
    before = token.read_text()
    secure_local_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == before
