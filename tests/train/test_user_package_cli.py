"""A user's own package and config files through the real command line (issue 19): the README's
one-line forms (``data=custom data._target_=... data.args.root=...``, ``model=custom``,
``task=custom``) and Hydra's ``--config-dir`` with the user's own group files, for ``qat-train``
in-process and ``qat-sweep`` on a local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_cli import cli_env
from helpers_sweep import sqlite, sweep_runs

BIN = Path(sys.executable).parent

PACKAGE = {
    "__init__.py": "",
    "data.py": '''
        """Digits written as .npy files under root/{train,val,test}/<class>/, read lazily."""
        from pathlib import Path

        import numpy as np
        import torch
        from torch.utils.data import Dataset

        from orchestrator.zoo.datasets import DataSplits


        class Folder(Dataset):
            def __init__(self, root):
                self.files = sorted((p, int(p.parent.name)) for p in Path(root).glob("*/*.npy"))

            def __len__(self):
                return len(self.files)

            def __getitem__(self, i):
                path, label = self.files[i]
                return torch.from_numpy(np.load(path)), label


        def splits(root: str) -> DataSplits:
            return DataSplits(*(Folder(Path(root) / s) for s in ("train", "val", "test")))
    ''',
    "models.py": '''
        from torch import nn


        class Net(nn.Module):
            """[N, 1, 8, 8] -> [N, classes]."""

            def __init__(self, width: int = 8, classes: int = 10):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(width * 64, classes))

            def forward(self, x):
                return self.body(x)
    ''',
    "tasks.py": '''
        from orchestrator.tasks import Classification


        class Digits(Classification):
            """Classification whose top-k metric is top-3."""

            def __init__(self, k: int = 3):
                super().__init__(top_k=k)
    ''',
}

CONFIG = {
    "data/mine.yaml": "name: mine\n_target_: mypkg.data.splits\nargs: {root: ROOT}\n",
    "model/mynet.yaml": "name: mynet\n_target_: mypkg.models.Net\nargs: {width: 8}\ncheckpoint: CKPT\n",
}


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A user's package (data, model, task), their digits files, weights and config directory."""
    from orchestrator.zoo.datasets import digits

    root = tmp_path_factory.mktemp("user-project")
    pkg = root / "src" / "mypkg"
    pkg.mkdir(parents=True)
    for name, text in PACKAGE.items():
        (pkg / name).write_text(textwrap.dedent(text))
    d = digits()
    import numpy as np

    for split in ("train", "val", "test"):
        x, y = getattr(d, split).tensors
        for i in range(len(y)):
            folder = root / "digits" / split / str(int(y[i]))
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{i}.npy", x[i].numpy())
    sys.path.insert(0, str(root / "src"))
    try:
        from mypkg.models import Net
    finally:
        sys.path.remove(str(root / "src"))
    torch.manual_seed(0)
    torch.save(Net(width=8).state_dict(), root / "net.pt")
    conf = root / "conf"
    for name, text in CONFIG.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text.replace("ROOT", str(root / "digits")).replace("CKPT", str(root / "net.pt")))
    return root


def _run(program: str, args: list[str], project: Path, cache: str) -> subprocess.CompletedProcess:
    env = {**cli_env(cache), "PYTHONPATH": str(project / "src")}
    proc = subprocess.run([str(BIN / program), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{program} {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_readme_one_line_forms_run_a_users_data_model_and_task(user_project, baseline_cache):
    out = user_project / "out-forms"
    proc = _run("qat-train", [f"paths.root={out}", "name=forms", "trainer=local", "qat.epochs=1",
                              "data=custom", "data._target_=mypkg.data.splits", f"data.args.root={user_project}/digits",
                              "model=custom", "model._target_=mypkg.models.Net", "model.args.width=8",
                              f"model.checkpoint={user_project}/net.pt",
                              "task=custom", "task._target_=mypkg.tasks.Digits", "task.args.k=3"],
                user_project, baseline_cache)
    assert "top3" in proc.stdout and "QAT 1 epoch(s)" in proc.stdout
    config = json.loads((out / "train" / "forms" / "identity.json").read_text())["config"]
    assert config["data.args.root"] == f"{user_project}/digits" and config["model.args.width"] == 8
    assert config["task.args.k"] == 3 and config["model.checkpoint"].startswith("sha256:")


@pytest.mark.slow
def test_a_users_config_dir_runs_qat_train_and_qat_sweep(user_project, baseline_cache):
    conf = ["--config-dir", str(user_project / "conf"), "data=mine", "model=mynet"]
    out = user_project / "out-confdir"
    train = _run("qat-train", [*conf, f"paths.root={out}", "name=mine", "trainer=local", "qat.epochs=1"],
                 user_project, baseline_cache)
    assert "QAT 1 epoch(s)" in train.stdout
    sweep = _run("qat-sweep", [*conf, f"paths.root={out}", "sweep=smoke", "sweep.name=mine"], user_project,
                 baseline_cache)
    assert "sweep mine: 2 trial(s)" in sweep.stdout
    _, parent, kids = sweep_runs(sqlite(out), "mine")
    assert parent.info.status == "FINISHED" and {k.info.status for k in kids} == {"FINISHED"}
    assert {k.data.params["data.name"] for k in kids} == {"mine"} and {k.data.params["model.name"] for k in kids} == {"mynet"}
