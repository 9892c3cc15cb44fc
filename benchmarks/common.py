"""Shared benchmark helpers: machine description, timing, memory saved for backward, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{dev}, {time.strftime('%Y-%m-%d')}")


def host_memory(keep_freed: bool) -> str:
    """Apply (or not) ``keep_freed_host_memory`` for every variant alike; a header fragment."""
    if not keep_freed:
        return "glibc malloc defaults"
    from orchestrator.quant import keep_freed_host_memory

    return "freed host memory kept (keep_freed_host_memory)" if keep_freed_host_memory() else "malloc defaults"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_ms(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, rounds: int,
                   per_round: int, reference: str) -> dict[str, tuple[float, float]]:
    """``{label: (median ms, median ratio to reference)}``, the variants timed in turns.

    Each round times every variant for ``per_round`` steps (median); the ratio is taken within a
    round and its median over rounds reported, so drift of a shared machine cancels out.
    """
    for step in steps.values():
        median_ms(step, device, warmup, 0)
    per = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            per[label].append(median_ms(step, device, 0, per_round))
    ref = per[reference]
    return {label: (statistics.median(t), statistics.median(a / b for a, b in zip(t, ref)))
            for label, t in per.items()}


def median_ms(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``step`` in ms (CUDA events on a GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    if iters == 0:
        return 0.0
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of every tensor autograd saves for the backward of ``forward()`` (which returns a
    tensor to backpropagate from; the backward runs, so the graph is freed)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.backward()
    return total
