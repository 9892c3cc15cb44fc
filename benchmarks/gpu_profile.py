"""Where a QAT step's time goes on CUDA: the CPU's time to issue a step beside the GPU's, and the
top kernels (torch.profiler), for the FP32 folded graph, static and range learning.

    python benchmarks/gpu_profile.py [--model resnet18] [--rows 18]

When "CPU issue" is close to "wall", the step is bound by the host (Python and launches), not by
the GPU's kernels: fewer or cheaper launches help, faster kernels do not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead as so  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=list(so.CASES))
    p.add_argument("--rows", type=int, default=18, help="kernels listed per variant")
    a = p.parse_args()
    dev = torch.device("cuda")
    case = so.CASES[a.model]
    torch.manual_seed(0)
    base = case.build().to(dev).eval()
    x = case.inputs(case.batch, dev)
    y = torch.randint(0, case.classes, (case.batch,), device=dev)
    ex = case.inputs(2, dev)
    calib = [case.inputs(16, dev) for _ in range(2)]
    variants = {
        "fp32 folded": lambda: so.folded_fp32(base, ex),
        "static": lambda: so.make_sim(base, ex, calib).model,
        "range learning": lambda: so.make_sim(base, ex, calib, range_learning=True).model,
    }
    from torch.profiler import ProfilerActivity, profile
    for label, make in variants.items():
        m = make().to(dev).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(so.call(m, x), y).backward()
            opt.step()

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        cpu = []
        t0 = time.perf_counter()
        for _ in range(10):
            c0 = time.perf_counter(); step(); cpu.append(time.perf_counter() - c0)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        kernels = [e for e in ev if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 3 / 1e3
        launches = sum(e.count for e in kernels) / 3
        print(f"\n== {a.model} {label}: wall {wall * 1e3:.2f} ms/step, CPU issue {sorted(cpu)[5] * 1e3:.2f} ms/step "
              f"(median), GPU kernels {gpu_ms:.2f} ms/step, {launches:.0f} kernel launches/step")
        print(ev.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=70))
        del m, opt


if __name__ == "__main__":
    main()
