"""Sweep overhead: wall time, time to the first lines, trial start to first step, cores busy.

    python benchmarks/sweep_overhead.py [--only default|smoke|ddp]

Runs real ``qat-sweep`` commands on a fresh output directory each (the FP32 baseline cache is
shared and warmed first, so no run pays for training it):

- ``default``: the default sweep (8 trials of 15 epochs: lr x mode x distillation, W4A4
  MNIST-1D), one worker per trial, trained inside the Tune trial actors;
- ``smoke``: ``sweep=smoke`` (2 trials, 1 epoch);
- ``ddp``: ``sweep=smoke trainer.num_workers=2`` (each trial a 2-worker Ray Train DDP group).

Reports the sweep's wall time; when its first line and its first trial line ("started ...")
appeared; each trial's ``startup_s`` (Tune trial start to first optimizer step, logged by the
trial to MLflow), for trials in a fresh actor (the first ``concurrency`` trials) and in a reused
one; and the cores' busy share over the run (sampled from /proc/stat every 0.5 s).
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
SCENARIOS = {
    "default": [],
    "smoke": ["sweep=smoke"],
    "ddp": ["sweep=smoke", "trainer.num_workers=2"],
}


def cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run(args: list[str], root: Path, cache: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QAT_CACHE_DIR": cache}
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        busy0, total0 = cpu_times()
        while not done.wait(0.5):
            busy1, total1 = cpu_times()
            if total1 > total0:
                samples.append((busy1 - busy0) / (total1 - total0))
            busy0, total0 = busy1, total1

    threading.Thread(target=sample, daemon=True).start()
    start = time.time()
    proc = subprocess.Popen([str(BIN / "qat-sweep"), f"paths.root={root}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=root)
    first_line = first_trial = None
    lines = []
    for line in proc.stdout:
        now = time.time() - start
        lines.append(line)
        first_line = first_line if first_line is not None else now
        if first_trial is None and "] started " in line:
            first_trial = now
    proc.wait()
    wall = time.time() - start
    done.set()
    if proc.returncode != 0:
        raise SystemExit(f"qat-sweep {' '.join(args)} failed:\n{''.join(lines)[-4000:]}")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qat")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`qat.kind` = 'trial'",
                              order_by=["attributes.start_time"])
    startups = [r.data.metrics["startup_s"] for r in runs if "startup_s" in r.data.metrics]
    concurrency = next(int(line.split("; ")[1].split()[0]) for line in lines if line.startswith("started in "))
    return {"trials": len(runs), "wall": wall, "first_line": first_line, "first_trial": first_trial,
            "cold": startups[:concurrency], "warm": startups[concurrency:],
            "busy": statistics.mean(samples) if samples else float("nan")}


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}" + (f" (max {max(values):.2f})" if len(values) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SCENARIOS), action="append", help="run only these scenarios")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="qat-bench-cache-") as cache:
        with tempfile.TemporaryDirectory() as warm:  # trains the FP32 baseline into the cache once
            subprocess.run([str(BIN / "qat-train"), f"paths.root={warm}", "trainer=local", "qat.epochs=0"],
                           capture_output=True, env={**os.environ, "QAT_CACHE_DIR": cache}, check=True)
        rows = []
        for name in args.only or list(SCENARIOS):
            with tempfile.TemporaryDirectory() as tmp:
                r = run(SCENARIOS[name], Path(tmp), cache)
            rows.append((name, " ".join(SCENARIOS[name]) or "(none)", r["trials"], f"{r['wall']:.0f}",
                         f"{r['first_line']:.1f}", f"{r['first_trial']:.1f}", _fmt(r["cold"]), _fmt(r["warm"]),
                         f"{100 * r['busy']:.0f}%"))
    print(f"sweep_overhead: qat-sweep, mnist1d_cnn W4A4 on MNIST-1D; {machine()}")
    print(table(("sweep", "overrides", "trials", "wall s", "1st line s", "1st trial s", "startup_s fresh actor",
                 "startup_s reused actor", "cores busy"), rows))


if __name__ == "__main__":
    main()
