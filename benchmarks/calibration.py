"""Calibration cost vs plain inference, per scheme.

    python benchmarks/calibration.py [--batches 8] [--repeats 3]

Plain inference: N forward passes of the float model (BN folded, eval, no grad). Calibration:
``sim.compute_encodings`` over the same N batches (weights quantized, every activation observed,
then each encoding computed; sim construction not included). Timed in turns, ``repeats`` times;
ratios are medians of per-turn ratios; resnet_cifar, batch 64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_memory, machine, table  # noqa: E402

from orchestrator.quant import QuantConfig, QuantizationSimModel  # noqa: E402
from orchestrator.zoo.models import ResNetCifar  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc thresholds alone (default: keep_freed_host_memory, as trials do)")
    args = p.parse_args()
    memory_setting = host_memory(not args.malloc_defaults)
    torch.manual_seed(0)
    model = ResNetCifar().eval()
    batches = [torch.randn(64, 3, 32, 32) for _ in range(args.batches)]
    float_sim = QuantizationSimModel(model, batches[0][:2], QuantConfig())
    float_sim.set_quantization_enabled(False)
    float_model = float_sim.model.eval()

    def infer():
        with torch.no_grad():
            for b in batches:
                float_model(b)

    def calibrate(scheme: str) -> float:
        sim = QuantizationSimModel(model, batches[0][:2], QuantConfig(quant_scheme=scheme))
        t0 = time.perf_counter()
        sim.compute_encodings(lambda m, bs: [m(b) for b in bs], batches)
        return time.perf_counter() - t0

    def inference() -> float:
        t0 = time.perf_counter()
        infer()
        return time.perf_counter() - t0

    schemes = ("min_max", "sqnr", "percentile")
    inference()
    for scheme in schemes:  # warm-up
        calibrate(scheme)
    times = {k: [] for k in ("inference", *schemes)}
    for _ in range(args.repeats):  # in turns: a shared VM's speed drifts
        times["inference"].append(inference())
        for scheme in schemes:
            times[scheme].append(calibrate(scheme))
    base = times["inference"]
    rows = [("plain inference (FP32, BN folded)", f"{statistics.median(base) * 1000:.0f}", "1.00")]
    for scheme in schemes:
        ratio = statistics.median(a / b for a, b in zip(times[scheme], base))
        rows.append((f"compute_encodings, {scheme}", f"{statistics.median(times[scheme]) * 1000:.0f}", f"{ratio:.2f}"))
    print(f"calibration: resnet_cifar, {args.batches} batches of 64, {args.repeats} turns; {machine()}; {memory_setting}")
    print(table(("what", "ms", "x inference"), rows))


if __name__ == "__main__":
    main()
