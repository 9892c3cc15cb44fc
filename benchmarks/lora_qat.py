"""Full QAT vs QAT with LoRA adapters (``qat.lora``) on ``model=llama_tiny``: one training step's cost.

    python benchmarks/lora_qat.py [--formats w2g32,w4g32a4,nvfp4] [--ranks 4,16] [--batch 32] [--rounds 3]

The built-in ``llama_tiny`` (its default config: 4 layers of width 128, ~0.85 M parameters; random
weights: cost does not depend on them) in a calibrated simulation per format, weight block scales
learned as in ``sweep=llm`` (range learning, ``learn_weight_encodings``; NVFP4's follow the weights). One step = forward +
next-token cross-entropy + backward + AdamW on a ``batch x 128``-byte batch (the recipe's step),
timed in turns (``common.interleaved_ms``; the ratio is to full QAT of the same format). Per variant:

- ``trained``: scalars the optimizer updates (model weights or adapters, plus the learned scales);
- ``params+grads+Adam``: bytes of every parameter (frozen ones too), the gradients and AdamW's two
  moments after a step;
- ``saved``: bytes autograd saves for backward in one forward (CPU; a tensor saved twice counts twice).

The perplexities come from real trials (``qat-sweep sweep=llm ... qat.lora.rank=...``), not from here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_ms, machine, saved_for_backward_bytes, table  # noqa: E402

from orchestrator.quant import QuantConfig, QuantizationSimModel, add_lora  # noqa: E402
from orchestrator.zoo.hf_models import llama_tiny  # noqa: E402

FORMATS = {  # the conf/quant presets, with sweep=llm's range learning
    "w2g32": dict(param_bw=2, param_block_size=32, quantize_activations=False),
    "w4g32a4": dict(param_bw=4, param_block_size=32, output_bw=4, output_granularity="per_token"),
    "nvfp4": dict(param_format="nvfp4", quantize_activations=False),  # its block scales follow the weights
}
LEARNED_SCALES = {"w2g32": True, "w4g32a4": True, "nvfp4": False}
VOCAB, SEQ = 256, 128


def tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def held_bytes(model, opt) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return params + grads + state


def variant(fmt: str, rank: int, calib: list[torch.Tensor]):
    torch.manual_seed(0)
    model = llama_tiny()
    cfg = QuantConfig(**FORMATS[fmt], range_learning=True, learn_weight_encodings=LEARNED_SCALES[fmt])
    sim = QuantizationSimModel(model, calib[0], cfg)
    sim.compute_encodings(lambda m, bs: [m(input_ids=b) for b in bs], calib)
    if rank:
        add_lora(sim, rank, alpha=2.0 * rank)
    sim.model.train()
    groups = [{"params": [p for p in sim.model_parameters() if p.requires_grad], "lr": 1e-3},
              sim.encoding_param_group(1e-3)]
    opt = torch.optim.AdamW([g for g in groups if g is not None and g["params"]])
    return sim, opt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="w2g32,w4g32a4,nvfp4")
    ap.add_argument("--ranks", default="4,16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ranks = [0] + [int(r) for r in args.ranks.split(",")]
    ids = tokens(args.batch, 7)
    calib = [tokens(8, s) for s in range(2)]
    rows = []
    for fmt in args.formats.split(","):
        steps, held, saved, trained = {}, {}, {}, {}
        for rank in ranks:
            label = f"{fmt} {'full QAT' if rank == 0 else f'LoRA r={rank}'}"
            sim, opt = variant(fmt, rank, calib)

            def step(m=sim.model, opt=opt):
                logits = m(input_ids=ids).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()
            held[label] = held_bytes(sim.model, opt)
            saved[label] = saved_for_backward_bytes(lambda: sim.model(input_ids=ids).logits.sum())
            trained[label] = sum(p.numel() for p in sim.model.parameters() if p.requires_grad)
            steps[label] = step
        timed = interleaved_ms(steps, torch.device("cpu"), warmup=1, rounds=args.rounds, per_round=2,
                               reference=f"{fmt} full QAT")
        for label in steps:
            ms, ratio = timed[label]
            rows.append((label, f"{trained[label]:,}", f"{held[label] / 2**20:.2f}", f"{saved[label] / 2**20:.1f}",
                         f"{ms:.0f}", f"{ratio:.2f}x"))
        print(rows[-len(steps):], flush=True)
    print(f"# llama_tiny (4 x 128, 0.85 M parameters), batch {args.batch}x{SEQ}, AdamW; {machine()}")
    print(table(("variant", "trained", "params+grads+Adam MiB", "saved MiB", "step ms", "vs full"), rows))


if __name__ == "__main__":
    main()
