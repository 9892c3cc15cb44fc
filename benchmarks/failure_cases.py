"""How bad input and faults end, as a user meets them (issue 13's table; issue 17's run-identity,
signal, concurrency and data cases).

    python benchmarks/failure_cases.py            # ~5 minutes; the disk-full case needs root (tmpfs)
    python benchmarks/failure_cases.py --only runs   # issue 17's cases alone

Each case runs the real command line (``qat-train``, ``qat-sweep``, ``qat-compare``) in a fresh
output directory on digits (small and quick; the FP32 baseline is cached first) and reports its
exit status, its wall time, the first line it printed on stderr and how many MLflow runs it left
RUNNING (the tracking store is read afterwards; "-" when it created none).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import machine, table  # noqa: E402

BIN = Path(sys.executable).parent
DIGITS = ["model=digits_cnn", "data=digits", "model.pretrain_epochs=15", "qat.epochs=1"]


class Planted:
    def __reduce__(self):
        return (os.system, ("touch /tmp/qat-failure-cases-planted-ran",))


def files(tmp: Path) -> dict[str, str]:
    """Checkpoint files a careless or hostile user may hand over."""
    paths = {"random": tmp / "random.pt", "empty": tmp / "empty.pt", "planted": tmp / "planted.pt",
             "other": tmp / "other.pt"}
    paths["random"].write_bytes(os.urandom(4096))
    paths["empty"].write_bytes(b"")
    torch.save({"conv.weight": Planted()}, paths["planted"])
    torch.save(torch.nn.Linear(3, 2).state_dict(), paths["other"])
    (tmp / "afile").write_text("x")
    return {k: str(v) for k, v in paths.items()}


def cases(tmp: Path, f: dict[str, str], tiny: Path | None) -> list[tuple[str, str, list[str]]]:
    out = [
        ("name escaping paths.root", "qat-train", ["name=../../escaped_train"]),
        ("dead tracking server", "qat-train", ["tracking.uri=http://127.0.0.1:1"]),
        ("unknown tracking scheme", "qat-train", ["tracking.uri=nosuch://x"]),
        ("paths.root is a file", "qat-train", [f"paths.root={tmp / 'afile'}"]),
        ("paths.root read-only", "qat-train", ["paths.root=/proc/qat-out"]),
        ("qat.lr=inf", "qat-train", ["qat.lr=inf"]),
        ("qat.lr=1e30", "qat-train", ["qat.lr=1e30"]),
        ("leaf_modules=[nosuch]", "qat-train", ["quant.leaf_modules=[nosuch]"]),
        ("checkpoint of random bytes", "qat-train", [f"model.checkpoint={f['random']}"]),
        ("empty checkpoint", "qat-train", [f"model.checkpoint={f['empty']}"]),
        ("planted pickle checkpoint", "qat-train", [f"model.checkpoint={f['planted']}"]),
        ("another model's checkpoint", "qat-train", [f"model.checkpoint={f['other']}"]),
        ("+model.args.bogus=1", "qat-train", ["+model.args.bogus=1"]),
        ("quant.param_bw=eight", "qat-train", ["quant.param_bw=eight"]),
        ("model=digits_cnnn", "qat-train", ["model=digits_cnnn"]),
        ("sweep=smok", "qat-sweep", ["sweep=smok"]),
        ("qat.lrr=1", "qat-train", ["qat.lrr=1"]),
        ("trainer.num_workers=64", "qat-train", ["trainer.num_workers=64"]),
        ("diverging lr (Adam, lr=1)", "qat-train", ["qat.lr=1.0", "qat.epochs=2"]),
        ("qat-compare, dead server", "qat-compare", ["--tracking-uri", "http://127.0.0.1:1"]),
    ]
    if tiny is not None:
        out.append(("disk full (256 KiB tmpfs)", "qat-sweep",
                    ["sweep=smoke", f"paths.root={tiny}", f"tracking.uri=sqlite:///{tmp / 'full-mlflow.db'}"]))
    return out


def running_runs(uri_db: Path) -> str:
    if not uri_db.exists():
        return "-"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{uri_db}")
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps]) if exps else []
    return f"{sum(r.info.status == 'RUNNING' for r in runs)} of {len(runs)}"


def mount_tiny(where: Path) -> Path | None:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True)
    return where if proc.returncode == 0 else None


def user_data_module(tmp: Path) -> Path:
    """A user's package with broken data builders (as tests/train/user_code.py has them)."""
    pkg = tmp / "userpkg"
    pkg.mkdir()
    (pkg / "brokendata.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from orchestrator.zoo.datasets import DataSplits, digits\n"
        "def _d(**r):\n"
        "    d = digits(); s = {'train': d.train, 'val': d.val, 'test': d.test, **r}\n"
        "    return DataSplits(s['train'], s['val'], s['test'], model_args={'num_classes': 10})\n"
        "def empty_val(**digits_args):\n"
        "    return _d(val=TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)))\n"
        "def label_12(**digits_args):\n"
        "    x, y = digits().test.tensors; y = y.clone(); y[300] = 12\n"
        "    return _d(test=TensorDataset(x, y))\n")
    return pkg


def _row(label: str, proc_or_code, seconds: float, stderr: str, after: str) -> tuple:
    err = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    code = proc_or_code if isinstance(proc_or_code, int) else proc_or_code.returncode
    return (label, code, f"{seconds:.1f}", len(errors), (errors[0] if errors else (err[-1] if err else ""))[:110],
            after)


def _wait(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if text in log.read_text():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{text!r} never appeared: {log.read_text()[-2000:]}")


def run_cases(tmp: Path, env: dict[str, str]) -> list[tuple]:
    """Issue 17: resumes and reruns of another config, SIGTERM in training and in export, two sweeps
    of one name, broken data, and the messages that name the cause."""
    rows = []
    train = [str(BIN / "qat-train"), *DIGITS[:-1], "trainer=local"]

    def run(label: str, argv: list[str], root: Path, extra_env: dict | None = None, after=None) -> None:
        start = time.time()
        proc = subprocess.run(argv, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=900)
        rows.append(_row(label, proc, time.time() - start, proc.stderr, after() if after else
                         running_runs(root / "mlflow.db")))

    def spawn(argv: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    root = tmp / "r"
    log = tmp / "r.log"
    proc = spawn([*train, f"paths.root={root}", "qat.epochs=3", "name=r3"], log)
    _wait(log, "epoch 1/3", proc)
    os.killpg(proc.pid, 9)
    proc.wait()
    run("kill -9, then resume with quant=w4a4", [*train, f"paths.root={root}", "qat.epochs=3", "name=r3", "quant=w4a4"],
        root)
    run("resume with the same config", [*train, f"paths.root={root}", "qat.epochs=3", "name=r3"], root)
    run("finished run, rerun with qat.lr=0.5", [*train, f"paths.root={root}", "qat.epochs=3", "name=r3", "qat.lr=0.5"],
        root)
    run("finished run, rerun with qat.restart", [*train, f"paths.root={root}", "qat.epochs=1", "name=r3", "quant=w4a4",
                                                 "qat.restart=true"], root)

    for phase, marker in (("training", "epoch 1/20"), ("export", None)):
        root = tmp / f"term-{phase}"
        log = tmp / f"term-{phase}.log"
        epochs = "20" if marker else "1"
        start = time.time()
        proc = spawn([*train, f"paths.root={root}", f"qat.epochs={epochs}", "name=t"], log)
        export = root / "train" / "t" / "export"
        if marker:
            _wait(log, marker, proc)
        else:
            while proc.poll() is None and not (export.is_dir() and any(p.name.startswith(".") for p in export.iterdir())):
                time.sleep(0.002)
        os.kill(proc.pid, 15)
        code = proc.wait()
        staged = len([p for p in export.iterdir() if p.name.startswith(".")]) if export.is_dir() else 0
        rows.append(_row(f"SIGTERM in {phase}", code, time.time() - start, log.read_text(),
                         f"{running_runs(root / 'mlflow.db')}; {staged} staging dir(s)"))

    root = tmp / "dup"
    log = tmp / "dup.log"
    sweep = [str(BIN / "qat-sweep"), f"paths.root={root}", "sweep=smoke", "sweep.name=dup", *DIGITS[:-1]]
    first = spawn(sweep, log)
    _wait(log, "started ", first)
    run("second sweep of the same name", sweep, root, after=lambda: "first still running" if first.poll() is None
        else f"first ended {first.returncode}")
    first.wait()
    run("first sweep, resumed with quant=w4a4", [*sweep, "sweep.resume=true", "quant=w4a4"], root)

    pkg = user_data_module(tmp)
    for label, target in (("empty val split", "empty_val"), ("test label 12 of 10 classes", "label_12")):
        root = tmp / target
        run(label, [*train, f"paths.root={root}", f"data._target_=brokendata.{target}", "data.name=user"], root,
            {"PYTHONPATH": str(pkg)})
    (tmp / "adir").mkdir()
    run("model.checkpoint is a directory", [*train, f"paths.root={tmp / 'c1'}", f"model.checkpoint={tmp / 'adir'}"],
        tmp / "c1")
    run("non-ASCII path, unquoted", [*train, f"paths.root={tmp / 'c2'}", "model.checkpoint=/tmp/modèle.pt"], tmp / "c2")
    run("qat-train -m name=a:b", [*train, "-m", f"paths.root={tmp / 'c3'}", "qat.lr=1e-3,1e-4", "name=a:b"], tmp / "c3")
    return rows


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    with tempfile.TemporaryDirectory(prefix="qat-failures-") as d:
        tmp = Path(d)
        env = {**os.environ, "QAT_CACHE_DIR": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        subprocess.run([str(BIN / "qat-train"), f"paths.root={tmp / 'warm'}", *DIGITS[:-1], "trainer=local",
                        "qat.epochs=0"],
                       env=env, capture_output=True, check=True)  # the FP32 baseline, cached
        f = files(tmp)
        tiny = mount_tiny(tmp / "tiny") if only is None else None
        rows = []
        try:
            for i, (label, program, args) in enumerate(cases(tmp, f, tiny) if only is None else []):
                out = tmp / f"case{i}"
                extra = [] if program == "qat-compare" else [f"paths.root={out}", *DIGITS]
                if program == "qat-train" and not any(a.startswith("trainer") for a in args):
                    extra.append("trainer=local")
                argv = [str(BIN / program), *extra, *args]
                start = time.time()
                proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
                seconds = time.time() - start
                err = [line for line in proc.stderr.splitlines() if line.strip()]
                db = tmp / "full-mlflow.db" if "disk full" in label else out / "mlflow.db"
                rows.append((label, proc.returncode, f"{seconds:.1f}", len(err), (err[0] if err else "")[:110],
                             running_runs(db)))
            if only in (None, "runs"):
                rows += run_cases(tmp, env)
        finally:
            if tiny is not None:
                subprocess.run(["umount", "-l", str(tiny)], check=False)
    planted_ran = os.path.exists("/tmp/qat-failure-cases-planted-ran")
    print(f"failure_cases: {machine()}; the planted pickle's code ran: {planted_ran}")
    print(table(("case", "exit", "s", "stderr lines", "first stderr line", "runs RUNNING after"), rows))


if __name__ == "__main__":
    main()
