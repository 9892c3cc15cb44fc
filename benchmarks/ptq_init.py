"""PTQ steps before QAT (``qat.init``) on MNIST-1D: accuracy after each step, and its cost.

    python benchmarks/ptq_init.py [--iterations 1000] [--calibration-batches 8]
    python benchmarks/ptq_init.py --calibration-only --settings W8A8,W4A8,W4A4,W3A3 --schemes min_max,sqnr,percentile

The cached FP32 baseline of ``mnist1d_cnn`` (trained once, as trials do), calibrated on
``calibration-batches`` batches of 64 training samples (the trial's draw, seed 0), measured on
the test split. Per setting (bit widths x activation calibration) each sequence of steps runs on a
fresh simulation through the trial's own code (``train/ptq_steps.calibrate_with_init``), which
measures after every step: ``[cle, seqmse, adaround]`` gives plain calibration and each step's
cumulative result; ``[cle, adaround]``, ``[adaround]``, ``[seqmse]`` the steps on their own;
``[seqmse, adaround]`` and ``[adaround]`` again with AdaRound learning from the float model's
inputs (``qat.ptq.adaround_quantized_inputs=false``) instead of the quantized model's.
Times are seconds per step (CLE: with the recalibration after it) on this machine.
``--calibration-only``: no steps, each setting x activation calibration scheme once (the choice
of the default ``quant.quant_scheme``), with the calibration's seconds.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

from orchestrator.quant import QuantizationSimModel  # noqa: E402
from orchestrator.train.builders import build_data, load_pretrained, pretrained_path, task_of  # noqa: E402
from orchestrator.train.config import PtqSpec, TrialConfig  # noqa: E402
from orchestrator.train.data import calibration_batches, eval_loader  # noqa: E402
from orchestrator.train.loops import evaluate  # noqa: E402
from orchestrator.train.ptq_steps import calibrate_with_init  # noqa: E402

SETTINGS = (("W4A4", 4, 4, "min_max"), ("W4A4", 4, 4, "sqnr"), ("W3A16", 3, 16, "min_max"))
BITS = re.compile(r"W(\d+)A(\d+)")
SEQUENCES = (("cle", "seqmse", "adaround"), ("cle", "adaround"), ("adaround",), ("seqmse",))
FLOAT_INPUTS = (("seqmse", "adaround"), ("adaround",))  # again with qat.ptq.adaround_quantized_inputs=false


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=PtqSpec.adaround_iterations)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--settings", default=",".join(f"{n}-{s}" for n, _, _, s in SETTINGS),
                   help="NAME-SCHEME pairs (steps), or with --calibration-only bit settings: W8A8,W4A4,...")
    p.add_argument("--calibration-only", action="store_true")
    p.add_argument("--schemes", default="min_max,sqnr,percentile", help="with --calibration-only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: a shared 2-core VM does not stall at OpenMP barriers)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TrialConfig()  # the defaults: mnist1d_cnn on mnist1d, classification
    cfg.model.pretrain_epochs = 150  # conf/model/mnist1d_cnn.yaml's recipe
    data = build_data(cfg.data)
    checkpoint, meta = pretrained_path(cfg.model, cfg.data, cfg.task, data)
    model = load_pretrained(cfg.model, data, checkpoint)
    task = task_of(cfg.task)
    cpu = torch.device("cpu")
    test = eval_loader(data.test, 512, 0, 1, cpu, data.collate_fn)
    calib = calibration_batches(data.train, 64, args.calibration_batches, 0, data.collate_fn)
    dummy = task.inputs(calib[0])
    fp32 = evaluate(model, test, task, cpu)["acc"]
    if args.calibration_only:
        calibration_table(cfg, model, task, calib, dummy, test, args, fp32)
        return
    wanted = set(args.settings.split(","))
    rows = []
    for name, wbits, abits, scheme in SETTINGS:
        if f"{name}-{scheme}" not in wanted:
            continue
        cfg.quant.param_bw, cfg.quant.output_bw, cfg.quant.quant_scheme = wbits, abits, scheme
        cfg.qat.ptq.adaround_iterations = args.iterations
        for steps, quantized_inputs in [(s, True) for s in SEQUENCES] + [(s, False) for s in FLOAT_INPUTS]:
            cfg.qat.init = list(steps)
            cfg.qat.ptq.adaround_quantized_inputs = quantized_inputs
            sim = QuantizationSimModel(model, dummy, cfg.quant_config())
            start = time.perf_counter()
            m = calibrate_with_init(cfg.qat, sim, task, calib, lambda: evaluate(sim.model, test, task, cpu),
                                    lambda msg: None)
            total = time.perf_counter() - start
            note = "" if quantized_inputs else " (AdaRound on float inputs)"
            if steps == SEQUENCES[0]:  # every prefix of the full sequence
                rows.append((name, scheme, "none (calibration only)", f"{m['ptq_plain_acc']:.2f}", ""))
                shown = [steps[:i + 1] for i in range(len(steps))]
            else:
                shown = [steps]
            for prefix in shown:
                rows.append((name, scheme, "[" + ",".join(prefix) + "]" + note, f"{m[f'ptq_after_{prefix[-1]}_acc']:.2f}",
                             ", ".join(f"{s} {m[f'ptq_{s}_s']:.1f}" for s in prefix)))
            print(f"  {name} {scheme} {list(steps)}{note}: {total:.0f}s", file=sys.stderr, flush=True)
    print(f"PTQ init steps: mnist1d_cnn (FP32 test acc {fp32:.2f}), {args.calibration_batches} x 64 calibration "
          f"samples, AdaRound {args.iterations} iterations/layer, {args.threads} thread(s); {machine()}")
    print(table(("setting", "act. calibration", "init steps", "PTQ test acc %", "seconds per step"), rows))


def calibration_table(cfg: TrialConfig, model, task, calib, dummy, test, args, fp32: float) -> None:
    """PTQ test accuracy per bit setting x activation calibration scheme, and its seconds."""
    cpu = torch.device("cpu")
    rows = []
    for setting in args.settings.split(","):
        match = BITS.fullmatch(setting)
        if not match:
            raise SystemExit(f"--settings: {setting!r} is not of the form W<bits>A<bits> (e.g. W4A4)")
        cfg.quant.param_bw, cfg.quant.output_bw = int(match[1]), int(match[2])
        cfg.qat.init = []
        for scheme in args.schemes.split(","):
            cfg.quant.quant_scheme = scheme
            sim = QuantizationSimModel(model, dummy, cfg.quant_config())
            start = time.perf_counter()
            sim.compute_encodings(lambda m, batches: [task.forward(m, b) for b in batches], calib)
            seconds = time.perf_counter() - start
            acc = evaluate(sim.model, test, task, cpu)["acc"]
            rows.append((setting, scheme, f"{acc:.2f}", f"{seconds:.2f}"))
            print(f"  {setting} {scheme}: {rows[-1][2]}", file=sys.stderr, flush=True)
    print(f"Activation calibration: mnist1d_cnn (FP32 test acc {fp32:.2f}), {args.calibration_batches} x 64 "
          f"calibration samples, {args.threads} thread(s); {machine()}")
    print(table(("setting", "act. calibration", "PTQ test acc %", "calibration seconds"), rows))


if __name__ == "__main__":
    main()
