"""Issue 9's table: real architectures end to end, one row per model.

    python benchmarks/architectures.py [--models bert gpt2 ...] [--rounds 5]

For each model of the quant acceptance tests (``tests/quant/test_acceptance_*.py``: Hugging Face
``transformers`` models built from small configs with random weights, torchvision-style and
recurrent models) and each family of ``tests/quant/test_export_architectures.py`` (decoder LMs,
encoder-decoders, CLIP/SigLIP/DeiT/Swin/ConvNeXtV2/SegFormer; the same builders, so the
numbers are the tests'): how many weight and
activation tensors the simulation quantizes, W8A8 output SQNR vs FP32 on held-out inputs (the
logits, and their input-dependent part), whether the export and onnxruntime's QDQ run agree
(top-1 on 32 inputs, or SQNR for language models), and the training-step time (forward, loss,
backward, Adam) of static and range-learning QAT relative to FP32, timed in turns.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests" / "quant"))
from common import interleaved_ms, machine, table  # noqa: E402

from orchestrator.quant import kernels  # noqa: E402


def _cases() -> dict:
    from acceptance import Case
    from test_acceptance_torch_models import CASES as TORCH_CASES
    from test_acceptance_transformers import CASES as HF_CASES
    from test_export_architectures import ARCHITECTURES

    families = [Case(f.name, f.make, lm=f.lm) for f in ARCHITECTURES]
    return {c.name: c for c in HF_CASES + families + TORCH_CASES}


def _loss_and_target(case, batch):
    """A training loss for the timed step: cross-entropy against 5 classes for classifiers; for
    token outputs the next token (of ``decoder_input_ids`` for encoder-decoders); per-pixel
    classes for segmentation (logits ``[B, C, H, W]``)."""
    from quant_checks import classification_loss, logits_of, next_token_loss

    g = torch.Generator().manual_seed(3)
    if not case.lm:
        return classification_loss, torch.randint(0, 5, (16,), generator=g)
    if isinstance(batch, dict) and "input_ids" not in batch and "decoder_input_ids" not in batch:
        with torch.no_grad():
            shape = logits_of(case.make()[0](**batch)).shape
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
        return (lambda out, t: torch.nn.functional.cross_entropy(logits_of(out), t)), target
    if isinstance(batch, dict):
        return next_token_loss, batch.get("decoder_input_ids", batch.get("input_ids"))
    return next_token_loss, batch


def _step_fn(model: torch.nn.Module, params: list, batch, loss_fn, target):
    from quant_checks import feed, logits_of

    opt = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(logits_of(feed(model, batch)), target).backward()
        opt.step()

    return step


def row(case, rounds: int, per_round: int) -> tuple:
    from acceptance import AcceptanceRun
    from quant_checks import calibrated

    run = AcceptanceRun(case)
    sim = run.sim
    sqnr = run.sqnr
    try:
        run.export
        ort = run.ort
        equal = ort.max_abs == 0.0
        if case.lm:
            agreement = "logits bit-equal" if equal else f"logits {ort.sqnr:.0f} dB"
        else:
            agreement = f"{100 * ort.top1:.0f}% top-1" + (", bit-equal" if equal else "")
    except Exception as exc:  # the row says why instead of stopping the table
        agreement = f"export failed: {type(exc).__name__}"
    batch = run.batch(16, 300)
    loss_fn, target = _loss_and_target(case, batch)
    static = calibrated(run.model, run.calibration, **case.config)
    learned = calibrated(run.model, run.calibration, range_learning=True, **case.config)
    for m in (run.model, static.model, learned.model):
        m.train()
    steps = {
        "fp32": _step_fn(run.model, list(run.model.parameters()), batch, loss_fn, target),
        "static": _step_fn(static.model, list(static.model.parameters()), batch, loss_fn, target),
        "rl": _step_fn(learned.model, static_groups(learned), batch, loss_fn, target),
    }
    timed = interleaved_ms(steps, torch.device("cpu"), 3, rounds, per_round, "fp32")
    return (case.name, str(len(sim.param_quantizers())), str(len(sim.activation_quantizers())),
            f"{sqnr.plain:.1f} / {sqnr.centered:.1f}", agreement, f"{timed['fp32'][0]:.1f}",
            f"{timed['static'][1]:.2f}", f"{timed['rl'][1]:.2f}")


def static_groups(sim) -> list:
    return [{"params": sim.model_parameters()}, {"params": sim.quantizer_parameters(), "lr": 1e-2}]


def main() -> None:
    cases = _cases()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(cases), choices=list(cases))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=5)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    print(f"architectures: W8A8 acceptance models, steps on batches of 16, variants interleaved {args.rounds} x "
          f"{args.per_round}; fake-quant kernel {kernels.backend()}; {machine()}")
    rows = [row(cases[name], args.rounds, args.per_round) for name in args.models]
    print(table(("model", "weights", "activations", "W8A8 SQNR dB (all / input-dep.)", "export -> ORT vs sim",
                 "FP32 ms/step", "static x FP32", "RL x FP32"), rows))


if __name__ == "__main__":
    main()
