"""How bad input and faults end, as a user meets them (issue 13's table).

    python benchmarks/failure_cases.py            # ~2 minutes; the disk-full case needs root (tmpfs)

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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="qat-failures-") as d:
        tmp = Path(d)
        env = {**os.environ, "QAT_CACHE_DIR": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        subprocess.run([str(BIN / "qat-train"), f"paths.root={tmp / 'warm'}", *DIGITS[:-1], "trainer=local",
                        "qat.epochs=0"],
                       env=env, capture_output=True, check=True)  # the FP32 baseline, cached
        f = files(tmp)
        tiny = mount_tiny(tmp / "tiny")
        rows = []
        try:
            for i, (label, program, args) in enumerate(cases(tmp, f, tiny)):
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
        finally:
            if tiny is not None:
                subprocess.run(["umount", "-l", str(tiny)], check=False)
    planted_ran = os.path.exists("/tmp/qat-failure-cases-planted-ran")
    print(f"failure_cases: {machine()}; the planted pickle's code ran: {planted_ran}")
    print(table(("case", "exit", "s", "stderr lines", "first stderr line", "runs RUNNING after"), rows))


if __name__ == "__main__":
    main()
