"""The launch recipes, verified for real on this machine: a 2-node Ray cluster (two `ray start`s on
loopback, token auth on), an `mlflow server` on PostgreSQL started by launch/mlflow-server.sh, and a
sweep submitted with launch/ray/submit.sh (`ray job submit`). Everything started is stopped.

PostgreSQL: 127.0.0.1:5432, trust auth, database `test` (a scratch database is created and
dropped). Without it the test skips, unless QAT_REQUIRE_POSTGRES=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_admin():
    try:
        import psycopg

        conn = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3,
                               autocommit=True)
    except Exception as exc:  # server missing, driver missing, refused
        if os.environ.get("QAT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is required here (QAT_REQUIRE_POSTGRES=1): {exc}")
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 (trust auth, database test): {exc}")
    return conn


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (what one `ray start` spawned)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == sid:
                    os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start_in_session(cmd: list[str], env: dict[str, str]) -> tuple[int, str, int]:
    """Run ``cmd`` to completion in a new session; ``(returncode, output, session id)``.

    The daemons a `ray start` leaves behind keep that session id, so ``kill_session`` finds them.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output, proc.pid


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


@pytest.fixture
def scratch_database():
    conn = postgres_admin()
    name = f"qat_launch_{secrets.token_hex(4)}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


@pytest.fixture
def mlflow_server(scratch_database, tmp_path):
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_BACKEND_STORE_URI": scratch_database,
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "mlflow-artifacts"), "MLFLOW_PORT": str(port)}
    log = tmp_path / "mlflow-server.log"
    proc = subprocess.Popen([str(REPO / "launch" / "mlflow-server.sh")], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_session(proc.pid)
        proc.wait()


@pytest.fixture
def two_node_ray():
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    # One temp dir per node, as on separate machines (sharing one, a node's runtime-env agent deletes
    # the job's working_dir under the other node's driver); short: Ray's unix socket paths < 108 bytes.
    temp_dirs = [tempfile.mkdtemp(prefix="qr-", dir="/tmp") for _ in range(2)]
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    # Every node's agents on free ports: another Ray on this machine (an earlier test's) may hold the defaults,
    # and a head whose job agent cannot bind answers every submission "No available agent".
    def agent_ports() -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    code, output, sid = start_in_session(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp_dirs[0]}",
         '--resources={"node_a": 1}', *common, *agent_ports()], env)
    sessions = [sid]
    try:
        assert code == 0, output[-2000:]
        code, output, sid = start_in_session(
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", '--resources={"node_b": 1}',
             f"--temp-dir={temp_dirs[1]}", *common, *agent_ports()],
            env)
        sessions.append(sid)
        assert code == 0, output[-2000:]
        yield {"dashboard": f"127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        for sid in sessions:
            kill_session(sid)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_sweep_submitted_to_a_two_node_cluster_lands_in_mlflow_server(two_node_ray, mlflow_server, tmp_path,
                                                                      baseline_cache):
    env = {**two_node_ray["env"], "MLFLOW_TRACKING_URI": mlflow_server, "QAT_CACHE_DIR": baseline_cache}
    # both nodes registered (ray status talks to the GCS with the token)
    deadline = time.time() + 60
    while True:
        status = subprocess.run([str(BIN / "ray"), "status", f"--address={two_node_ray['gcs']}"], env=env,
                                capture_output=True, text=True)
        if status.stdout.count("node_") >= 2 or time.time() > deadline:
            break
        time.sleep(2)
    assert "1 node_a" in status.stdout or "node_a" in status.stdout, status.stdout + status.stderr
    out = tmp_path / "shared-outputs"  # "shared storage": one filesystem for both nodes here
    submit = subprocess.run(
        [str(REPO / "launch" / "ray" / "submit.sh"), two_node_ray["dashboard"], f"paths.root={out}",
         "sweep.name=cluster", "qat.lr=0.001,0.0003", "qat.epochs=1", "qat.range_learning=false",
         "qat.distill.enabled=false", "trainer.num_workers=2",
         f"trainer.storage_path={out / 'ray'}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout, submit.stdout[-3000:]

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("qat")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`qat.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["qat.sweep_name"] == "cluster"
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 2 and {k.info.status for k in kids} == {"FINISHED"}
    nodes = set()
    for k in kids:
        assert "test_acc" in k.data.metrics and "val_acc" in k.data.metrics
        nodes.update(k.data.tags["qat.nodes"].split(","))
        local = client.download_artifacts(k.info.run_id, "export/model.encodings", str(tmp_path / k.info.run_id))
        assert Path(local).read_text().lstrip().startswith("{")
    assert len(nodes) == 2, f"trials ran on {nodes}; expected both nodes"
    # artifacts went through the server into its artifact destination, not to the client's disk
    assert any((tmp_path / "mlflow-artifacts").rglob("model.encodings"))


def test_mlflow_server_refuses_to_leave_loopback_without_opt_in(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_BACKEND_STORE_URI": "postgresql://x@h/db",
           "MLFLOW_HOST": "0.0.0.0"}
    env.pop("MLFLOW_ALLOW_REMOTE", None)
    proc = subprocess.run([str(REPO / "launch" / "mlflow-server.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "MLFLOW_ALLOW_REMOTE=1" in proc.stderr
    env["MLFLOW_ALLOW_REMOTE"] = "1"
    proc = subprocess.run([str(REPO / "launch" / "mlflow-server.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in proc.stderr
