"""Quantizer formats on a small ``transformers`` LlamaForCausalLM: output SQNR vs FP32, step cost.

    python benchmarks/formats_llama.py [--hidden 256] [--layers 2] [--rounds 3]

The model is built from a small config with random weights (no download); its RMSNorm weights are
varied (trained norms are not all ones). Each variant is a ``QuantizationSimModel`` calibrated on
4 batches; SQNR is of the logits against the FP32 model's on 4 held-out batches (eval mode). One
step = forward + next-token cross-entropy + backward + SGD on random tokens; the ratio is to the
FP32 step, timed in turns (``common.interleaved_ms``). Memory: bytes saved for backward in one
forward pass (CPU), as ``step_overhead.py`` reports.

Variants: weight-only int4 per output channel; weight-only int4 in blocks of 32, 64 and 128 along the
input dim (``quant=w4g128``); int4 g32 weights + int8 dynamic per-token activations
on every op output and at the Linear inputs only (``quant=w4g32a8``); FP8 e4m3 weights per channel
+ activations per tensor, both placements (``quant=fp8``: Linear inputs), and with range learning
(the LLM sweep's mode: the activation scales train); W4 LPBQ in blocks of 64
(``quant=w4lpbq``, with its 16-bit activations, and weight-only); MXFP8, MXFP4 and NVFP4 weight-only
and with their dynamic block activations on every op output and at the Linear inputs
(``quant=mxfp8``/``mxfp4``/``nvfp4``); W8A8. Every path runs a fused C++ op (integer, or the float
op for FP8/MX/NVFP4 elements) except learned blocks (the reference's learned op).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_ms, machine, saved_for_backward_bytes, table  # noqa: E402

from orchestrator.quant import QuantConfig, QuantizationSimModel  # noqa: E402

VARIANTS = {
    "W4 per-channel (weight-only)": dict(param_bw=4, quantize_activations=False),
    "W4 g128 (weight-only)": dict(param_bw=4, param_block_size=128, quantize_activations=False),
    "W4 g32 (weight-only)": dict(param_bw=4, param_block_size=32, quantize_activations=False),
    "W4 g32 A8 per-token, every op output": dict(param_bw=4, param_block_size=32, output_granularity="per_token"),
    "FP8 e4m3 W+A, every op output": dict(param_format="float8_e4m3fn", output_format="float8_e4m3fn", quant_scheme="min_max"),
    "W4 g64 (weight-only)": dict(param_bw=4, param_block_size=64, quantize_activations=False),
    "W4 LPBQ g64 A16 (quant=w4lpbq)": dict(param_bw=4, param_format="lpbq", param_block_size=64, output_bw=16),
    "W4 LPBQ g64 (weight-only)": dict(param_bw=4, param_format="lpbq", param_block_size=64,
                                      quantize_activations=False),
    "MXFP8, weight-only": dict(param_format="mxfp8", quantize_activations=False),
    "MXFP4, weight-only": dict(param_format="mxfp4", quantize_activations=False),
    "NVFP4, weight-only": dict(param_format="nvfp4", quantize_activations=False),
    "MXFP8 W+A, every op output": dict(param_format="mxfp8", output_format="mxfp8"),
    "MXFP4 W+A, every op output": dict(param_format="mxfp4", output_format="mxfp4"),
    "NVFP4 W+A, every op output": dict(param_format="nvfp4", output_format="nvfp4"),
    "W4 g32 A8 per-token at layer inputs (quant=w4g32a8)": dict(param_bw=4, param_block_size=32,
                                                               output_granularity="per_token",
                                                               activation_sites="layer_inputs"),
    "FP8 e4m3 W+A at layer inputs (quant=fp8)": dict(param_format="float8_e4m3fn", output_format="float8_e4m3fn",
                                                     quant_scheme="min_max", activation_sites="layer_inputs"),
    "FP8 W+A at layer inputs, range learning (sweep=llm)": dict(
        param_format="float8_e4m3fn", output_format="float8_e4m3fn", quant_scheme="min_max",
        activation_sites="layer_inputs", range_learning=True),
    "MXFP8 W+A at layer inputs (quant=mxfp8)": dict(param_format="mxfp8", output_format="mxfp8",
                                                    activation_sites="layer_inputs"),
    "MXFP4 W+A at layer inputs (quant=mxfp4)": dict(param_format="mxfp4", output_format="mxfp4",
                                                    activation_sites="layer_inputs"),
    "NVFP4 W+A at layer inputs (quant=nvfp4)": dict(param_format="nvfp4", output_format="nvfp4",
                                                    activation_sites="layer_inputs"),
    "W8A8 (per-channel/per-tensor)": dict(),
}
VOCAB, SEQ, BATCH = 256, 32, 4


def llama(hidden: int, layers: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=max(2, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=64, initializer_range=0.05)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = llama(args.hidden, args.layers)
    calib = [tokens(s) for s in range(4)]
    held_out = [tokens(100 + s) for s in range(4)]
    with torch.no_grad():
        ref = torch.cat([model(input_ids=b).logits.reshape(-1) for b in held_out]).double()

    def run(m, _):
        for b in calib:
            m(input_ids=b)

    models = {"FP32": model}
    sqnr = {}
    for label, cfg in VARIANTS.items():
        sim = QuantizationSimModel(model, calib[0], QuantConfig(**cfg))
        sim.compute_encodings(run, None)
        sim.model.eval()
        with torch.no_grad():
            out = torch.cat([sim.model(input_ids=b).logits.reshape(-1) for b in held_out]).double()
        sqnr[label] = 10 * torch.log10(ref.square().sum() / (ref - out).square().sum()).item()
        models[label] = sim.model

    ids = tokens(7)
    steps = {}
    for label, m in models.items():
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            logits = m(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[label] = step
    timed = interleaved_ms(steps, torch.device("cpu"), warmup=2, rounds=args.rounds, per_round=3, reference="FP32")
    rows = []
    for label in models:
        ms, ratio = timed[label]
        mem = saved_for_backward_bytes(lambda m=models[label]: m(input_ids=ids).logits.sum()) / 2**20
        rows.append((label, "-" if label == "FP32" else f"{sqnr[label]:.1f}", f"{ms:.1f}", f"{ratio:.2f}x",
                     f"{mem:.1f}"))
    print(f"# LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}, batch {BATCH}x{SEQ}; "
          f"{machine()}")
    print(table(("variant", "SQNR dB vs FP32", "step ms", "vs FP32", "saved MiB"), rows))


if __name__ == "__main__":
    main()
