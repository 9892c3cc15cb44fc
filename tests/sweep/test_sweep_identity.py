"""One sweep per name at a time, and a resumed sweep is the sweep it was (issue 17), through the
real command line on a local Ray."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from helpers_cli import run_cli, running, wait_for
from helpers_sweep import sqlite, sweep_runs

from orchestrator.sweep.lock import SweepLock, SweepLocked, lock_path


def test_a_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    first = SweepLock(tmp_path, "s").acquire()
    with pytest.raises(SweepLocked, match=r"sweep.name='s' is running already: pid \d+ on host .+, started "):
        SweepLock(tmp_path, "s").acquire()
    first.release()
    assert not lock_path(tmp_path, "s").exists() and not (tmp_path / "sweeps").exists()  # nothing left behind
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_path(tmp_path, "s").parent.mkdir()
    lock_path(tmp_path, "s").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                    "started": "2026-12-05T00:00:00Z"}))
    taken = SweepLock(tmp_path, "s").acquire()  # the file stayed; its holder is gone with its lock
    assert taken.took_over == f"pid {dead.pid} on host {socket.gethostname()}, started 2026-12-05T00:00:00Z"
    taken.release()


@pytest.mark.slow
def test_a_second_driver_is_refused_and_a_changed_resume_is_refused(tmp_path, baseline_cache):
    args = [f"paths.root={tmp_path}", "sweep=smoke", "sweep.name=dup", "model=digits_cnn", "data=digits",
            "model.pretrain_epochs=15"]
    log = tmp_path / "first.log"
    with running("qat-sweep", args, tmp_path, baseline_cache, log) as first:
        wait_for(log, "started ", timeout=900, proc=first)
        second = run_cli("qat-sweep", args, tmp_path, baseline_cache, check=False)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: sweep.name='dup' is running already: pid {first.pid} on host "), line
        assert first.wait(timeout=900) == 0, log.read_text()[-3000:]  # the first is unharmed
    _, parent, kids = sweep_runs(sqlite(tmp_path), "dup")
    assert parent.info.status == "FINISHED" and len(kids) == 2
    assert {k.info.status for k in kids} == {"FINISHED"}

    changed = run_cli("qat-sweep", [*args, "sweep.resume=true", "quant=w8a8"], tmp_path, baseline_cache, check=False)
    assert changed.returncode == 2, changed.stdout[-2000:] + changed.stderr[-2000:]
    (line,) = changed.stderr.strip().splitlines()
    assert line.startswith("error: sweep 'dup': trial ") and "quant.param_bw: 4 -> 8" in line, line
    assert "sweep.name=..." in line
    _, parent_after, kids_after = sweep_runs(sqlite(tmp_path), "dup")
    assert parent_after.info.status == "FINISHED" and len(kids_after) == 2

    same = run_cli("qat-sweep", [*args, "sweep.resume=true"], tmp_path, baseline_cache)  # nothing left to run
    assert "(resuming)" in same.stdout and "registered: models:/digits_cnn-digits-qat/1 " in same.stdout
    client, parent_again, kids_again = sweep_runs(sqlite(tmp_path), "dup")
    assert len(kids_again) == 2 and len(client.search_model_versions("name='digits_cnn-digits-qat'")) == 1


def test_a_sweep_driven_from_another_host_is_refused_through_mlflow(tmp_path):
    from mlflow import MlflowClient

    from orchestrator.sweep.lock import DRIVER_TAG, check_tracked_driver
    from orchestrator.tracking.mlflow_runs import SWEEP_ID_TAG, ensure_experiment

    uri = sqlite(tmp_path)
    exp = ensure_experiment(uri, "qat")
    client = MlflowClient(uri)
    other = json.dumps({"host": "node-7", "pid": 4242, "started": "2026-12-05T09:00:00Z"})
    run = client.create_run(exp, tags={SWEEP_ID_TAG: "s-1", DRIVER_TAG: other})
    with pytest.raises(SweepLocked, match="is running already on another host: pid 4242 on host node-7"):
        check_tracked_driver(uri, "qat", "s-1", "s")
    client.set_terminated(run.info.run_id, "KILLED")  # what its message says to do when that driver is gone
    check_tracked_driver(uri, "qat", "s-1", "s")
    mine = json.dumps({"host": socket.gethostname(), "pid": 1, "started": "2026-12-05T09:00:00Z"})
    client.create_run(exp, tags={SWEEP_ID_TAG: "s-2", DRIVER_TAG: mine})
    check_tracked_driver(uri, "qat", "s-2", "s")  # this host's drivers: the lock file decides
