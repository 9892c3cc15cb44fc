"""Training-step throughput of llama_tiny with per-token activations, beside weight-only.

    python benchmarks/per_token_step.py [--batch 8] [--seq 128] [--steps 6] [--rounds 3]

``model=llama_tiny``'s architecture (4 layers of width 128, random weights) in a
``QuantizationSimModel`` per preset (``w2g32`` weight-only, ``w4g32a8``, ``w4g32a4``; static
encodings: weights follow, activations per token), calibrated on 2 batches. One step = forward +
next-token cross-entropy + backward + AdamW on random bytes; samples/s is the median over rounds
of ``steps`` steps, the presets timed in turns (round-robin) so that load drifts hit all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

from orchestrator.quant import QuantConfig, QuantizationSimModel  # noqa: E402
from orchestrator.zoo.hf_models import llama_tiny  # noqa: E402

PRESETS = {
    "w2g32 (weight-only)": dict(param_bw=2, param_block_size=32, quantize_activations=False),
    "w4g32a8": dict(param_bw=4, param_block_size=32, output_bw=8, output_granularity="per_token"),
    "w4g32a4": dict(param_bw=4, param_block_size=32, output_bw=4, output_granularity="per_token"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = llama_tiny(max_length=args.seq)

    def ids(seed: int) -> torch.Tensor:
        return torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(seed))

    runs = {}
    for label, cfg in PRESETS.items():
        sim = QuantizationSimModel(model, (ids(0),), QuantConfig(**cfg))
        sim.compute_encodings(lambda m, bs: [m(b) for b in bs], [ids(1), ids(2)])
        sim.model.train()
        opt = torch.optim.AdamW(sim.model.parameters(), lr=1e-4)

        def step(m=sim.model, opt=opt):
            x = ids(3)
            logits = m(x).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm up
        runs[label] = (step, [])
    for _ in range(args.rounds):
        for step, times in runs.values():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times.append((time.perf_counter() - t0) / args.steps)
    rows = []
    for label, (_, times) in runs.items():
        sec = statistics.median(times)
        rows.append([label, f"{1000 * sec:.0f}", f"{args.batch / sec:.1f}"])
    print(machine(), f"batch {args.batch} x {args.seq} bytes, median of {args.rounds} rounds of {args.steps} steps")
    print(table(["preset", "ms/step", "samples/s"], rows))


if __name__ == "__main__":
    main()
