"""Sweep overhead: trial start to first training step, and how busy the cores stay.

    python benchmarks/sweep_overhead.py [--trials 8]

Runs real ``qat-sweep`` commands (digits, 1 epoch per trial, ``--trials`` learning rates) in
two layouts: Ray Train workers (1 worker per trial, as many trials at once as cores) and
in-process trials (``trainer=local``). Reports each trial's ``startup_s`` (Tune trial start to
its first optimizer step, logged by the trial to MLflow), the sweep's wall time, and the cores'
busy share over the sweep (sampled from /proc/stat every 0.5 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

BIN = Path(sys.executable).parent


def cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run(layout: list[str], trials: int, root: Path) -> tuple[float, float, list[float]]:
    lrs = ",".join(f"{1e-3 * 0.7 ** i:.6f}" for i in range(trials))
    args = [str(BIN / "qat-sweep"), f"paths.root={root}", "sweep.name=overhead", f"sweep.space.qat.lr.grid=[{lrs}]",
            "sweep.space.qat.epochs.grid=[1]", "sweep.space.qat.range_learning.grid=[false]", *layout]
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        busy0, total0 = cpu_times()
        while not done.wait(0.5):
            busy1, total1 = cpu_times()
            if total1 > total0:
                samples.append((busy1 - busy0) / (total1 - total0))
            busy0, total0 = busy1, total1

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.time()
    sampler.start()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    done.set()
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"qat-sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qat")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`qat.kind` = 'trial'")
    startups = [r.data.metrics["startup_s"] for r in runs if "startup_s" in r.data.metrics]
    return wall, statistics.mean(samples) if samples else float("nan"), startups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--layout", choices=["ray", "local"], help="run only this layout (default: both)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    layouts = {
        "Ray Train, 1 worker/trial": ["trainer.num_workers=1"],
        "in-process trials": ["trainer=local", f"sweep.max_concurrent_trials={cores}"],
    }
    rows = []
    for name, layout in layouts.items():
        if args.layout and not name.startswith({"ray": "Ray", "local": "in-process"}[args.layout]):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            wall, busy, startups = run(layout, args.trials, Path(tmp))
        rows.append((name, args.trials, f"{wall:.0f}", f"{statistics.median(startups):.1f}", f"{max(startups):.1f}",
                     f"{100 * busy:.0f}%"))
    print(f"sweep_overhead: digits_cnn, 1 epoch per trial; {machine()}")
    print(table(("layout", "trials", "sweep wall s", "startup_s median", "startup_s max", "cores busy"), rows))


if __name__ == "__main__":
    main()
