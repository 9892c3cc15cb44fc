"""The launch recipes parse and carry what their tools need; shell scripts pass `bash -n`; no secrets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((LAUNCH / name).read_text()) if d is not None]


@pytest.mark.parametrize("script", ["mlflow-server.sh", "mlflow-worker-user.sh", "ray/submit.sh",
                                    "slurm/qat-sweep.sbatch"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["ray/cluster-aws.yaml", "ray/cluster-onprem.yaml"])
def test_ray_up_configs(name):
    (cfg,) = load_all(name)
    for key in ("cluster_name", "provider", "auth", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "file_mounts"):
        assert key in cfg, key
    assert cfg["provider"]["type"] in ("aws", "local")
    if cfg["provider"]["type"] == "aws":
        assert cfg["head_node_type"] in cfg["available_node_types"]
        assert any("g5" in t["node_config"]["InstanceType"] for t in cfg["available_node_types"].values())
    else:
        assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--port=6379" not in " ".join(starts)  # Redis owns 6379 on our machines
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_kuberay_rayjob():
    (job,) = load_all("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("qat-sweep ") and "trainer=gpu" in spec["entrypoint"]
    assert "storage_path=/mnt/shared" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay makes the token, pods and submitter get it
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert "RAY_AUTH_TOKEN" not in env  # the operator's, not a second one of ours
            assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "qat-mlflow-client"
            assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
        assert any(v.get("persistentVolumeClaim") for v in pod["spec"]["volumes"])
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_kuberay_mlflow_server():
    docs = load_all("kuberay/mlflow.yaml")
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Deployment") == 1 and "StatefulSet" in kinds and kinds.count("Service") == 2
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    (pvc,) = load_all("kuberay/shared-storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_slurm_script_uses_symmetric_run_and_token_auth():
    text = (LAUNCH / "slurm" / "qat-sweep.sbatch").read_text()
    assert "ray symmetric-run" in text and "RAY_AUTH_MODE=token" in text and "#SBATCH --nodes" in text


def test_no_secret_in_any_launch_file():
    suspicious = re.compile(r"(password|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{12,}", re.IGNORECASE)
    for path in LAUNCH.rglob("*"):
        if path.is_file():
            for line in path.read_text().splitlines():
                if "secretKeyRef" in line or "openssl rand" in line or line.strip().startswith("#"):
                    continue
                assert not suspicious.search(line), f"{path}: {line}"
