"""``pip install`` of the built wheel (not editable) gives working qat-train, qat-sweep, qat-compare and
qat-analyze: the Hydra configs ship as package data and the `tune` sweeper is found in the installed tree."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel installed (no editable path, no repository on sys.path); its
    third-party dependencies come from this environment (a .pth line after its own site-packages),
    so the test needs no network."""
    tmp = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", REPO],
        tmp)
    (wheel,) = (tmp / "dist").glob("qat_orchestrator-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", venv], tmp)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], tmp)
    return wheel, venv, tmp


def test_the_wheel_carries_the_configs_and_the_sweeper(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("orchestrator/conf/sweep.yaml", "orchestrator/conf/train.yaml", "orchestrator/conf/analyze.yaml",
                 "orchestrator/conf/sweep/default.yaml",
                 "orchestrator/conf/quant/w4a4.yaml", "hydra_plugins/qat_tune_sweeper/tune_sweeper.py"):
        assert name in names, name


@pytest.mark.slow
def test_installed_clis_work_outside_the_checkout(installed, baseline_cache):
    _, venv, tmp = installed
    work = tmp / "work"  # not the repository: nothing there to import or read configs from
    work.mkdir()
    env = {**os.environ, "QAT_CACHE_DIR": baseline_cache, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    where = run([venv / "bin" / "python", "-c", "import orchestrator, hydra_plugins.qat_tune_sweeper as p; "
                 "print(orchestrator.__file__); print(p.__file__)"], work, env).stdout
    assert all(line.startswith(str(venv)) for line in where.split()), where
    assert "qat-train: run one quantization-aware-training trial" in run([venv / "bin" / "qat-train", "--help"],
                                                                         work, env).stdout
    assert "usage: qat-compare" in run([venv / "bin" / "qat-compare", "--help"], work, env).stdout
    assert "qat-analyze: the sensitivity of every weight" in run([venv / "bin" / "qat-analyze", "--help"], work,
                                                                 env).stdout
    sweep = run([venv / "bin" / "qat-sweep", f"paths.root={work / 'out'}", "sweep=smoke"], work, env)
    assert "sweep smoke: 2 trial(s) in" in sweep.stdout and "registered: models:/" in sweep.stdout
    compare = run([venv / "bin" / "qat-compare", "--tracking-uri", f"sqlite:///{work / 'out' / 'mlflow.db'}",
                   "--out", work / "cmp"], work, env)
    assert "sweep smoke" in compare.stdout and (work / "cmp" / "smoke.png").exists()
