"""Why int4 per-token (and FP4 block) exports disagree with their simulation end to end: the simulation's
own conditioning.

    python benchmarks/per_token_agreement.py [--layers 2] [--hidden 64]

A random ``LlamaForCausalLM`` (byte vocabulary, RMSNorm weights varied). Per variant (int4 g32
weights with int8 / int4 per-token activations; MXFP8, MXFP4 and NVFP4 weights and dynamic block
activations): logits SQNR and top-1 of (a) onnxruntime's QDQ run of
the export against ``sim.model`` (``export_agreement``), (b) ``sim.model`` against the same
simulation of the model whose embedding is scaled by ``1 + 2^-22`` (a no-op in real arithmetic:
RMSNorm divides it out; 2 ulps in float32), and the fraction of elements of each per-token
quantizer's input that sit on an exact tie ``x / s = k + 1/2`` (within 8 ulps), summed over
quantizers (per-token variants). (b) as low as (a) means the disagreement is the simulation's sensitivity to last-bit
differences, which onnxruntime's float ops (another summation order) supply.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

from orchestrator.quant import QuantConfig, QuantizationSimModel  # noqa: E402
from orchestrator.quant.agreement import export_agreement  # noqa: E402
from orchestrator.quant.encoding import asymmetric_from_range  # noqa: E402
from orchestrator.zoo.hf_models import llama_tiny  # noqa: E402


def sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    noise = float((a.double() - b.double()).square().sum())
    return 10 * math.log10(float(a.double().square().sum()) / max(noise, 1e-300))


def tokens(seed: int, n: int = 2) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))}


VARIANTS = {
    "int4 g32 + int8 per token": dict(param_bw=4, param_block_size=32, output_bw=8, output_granularity="per_token"),
    "int4 g32 + int4 per token": dict(param_bw=4, param_block_size=32, output_bw=4, output_granularity="per_token"),
    "MXFP8 W+A, every op output": dict(param_format="mxfp8", output_format="mxfp8"),
    "MXFP4 W+A, every op output": dict(param_format="mxfp4", output_format="mxfp4"),
    "NVFP4 W+A, every op output": dict(param_format="nvfp4", output_format="nvfp4"),
}


def simulate(model, cfg: dict) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, tokens(0), QuantConfig(**cfg))
    sim.compute_encodings(lambda m, bs: [m(**b) for b in bs], [tokens(s) for s in range(3)])
    return sim


@torch.no_grad()
def tie_fraction(sim: QuantizationSimModel, batch: dict) -> float:
    """Fraction of per-token quantizer input elements within 8 ulps of a half step."""
    seen = []
    hooks = [q.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), m.bitwidth)))
             for q in sim.activation_quantizers().values()]
    sim.model(**batch)
    for h in hooks:
        h.remove()
    ties = total = 0
    for x, bits in seen:
        lo, hi = torch.aminmax(x.float(), dim=-1, keepdim=True)
        s, _ = asymmetric_from_range(lo, hi, bits)
        u = x / s
        ties += int(((u - u.floor() - 0.5).abs() < 8 * torch.finfo(torch.float32).eps * u.abs().clamp(min=1)).sum())
        total += x.numel()
    return ties / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = llama_tiny(layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       max_length=32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(1 + 2**-22)
    held_out = [tokens(s) for s in range(10, 14)]
    with torch.no_grad():
        ref = torch.cat([model(**b).logits for b in held_out])
        float_self = sqnr(ref, torch.cat([other(**b).logits for b in held_out]))
    rows = [["float (no quantizers)", "-", "-", f"{float_self:.1f}", "-", "-"]]
    for label, cfg in VARIANTS.items():
        sim, twin = simulate(model, cfg), simulate(other, cfg)
        with tempfile.TemporaryDirectory() as tmp:
            agreement = export_agreement(sim, sim.export(tmp, "m"), held_out)
        with torch.no_grad():
            a = torch.cat([sim.model(**b).logits for b in held_out])
            b = torch.cat([twin.model(**b).logits for b in held_out])
        top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        ties = f"{100 * tie_fraction(sim, held_out[0]):.2f}%" if "per token" in label else "-"
        rows.append([label, f"{agreement.sqnr_db:.1f}", f"{agreement.top1:.3f}", f"{sqnr(a, b):.1f}", f"{top1:.3f}",
                     ties])
    print(machine())
    print(table(["variant", "ORT vs sim dB", "top-1", "sim vs sim(emb*(1+2^-22)) dB", "top-1", "ties"], rows))


if __name__ == "__main__":
    main()
