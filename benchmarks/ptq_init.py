"""PTQ steps before QAT (``qat.init``): the task metric after each step, and its cost.

    python benchmarks/ptq_init.py [--iterations 1000] [--calibration-batches 8]
    python benchmarks/ptq_init.py --calibration-only --settings W8A8,W4A8,W4A4,W3A3 --schemes min_max,sqnr,percentile
    python benchmarks/ptq_init.py --overrides "model=digits_cnn data=digits" --settings W4A4-sqnr,W3A3-sqnr
    python benchmarks/ptq_init.py --overrides "model=llama_tiny data=python_text task=language_modeling" \
        --settings W4A16-sqnr,W4A8-sqnr

The trial config is what ``qat-train <overrides>`` composes (default: ``mnist1d_cnn`` on
``mnist1d``); its cached FP32 baseline (trained once, as trials do) is calibrated on
``calibration-batches`` batches of 64 training samples (the trial's draw, seed 0) and measured
on the test split with the task's primary metric (``acc``, ``ppl``). Per setting (bit widths x
activation calibration) each sequence of steps (``--sequences``) runs on a fresh simulation
through the trial's own code (``train/ptq_steps.calibrate_with_init``), which measures after
every step: the first sequence gives plain calibration and each step's cumulative result, the
others their end result. AdaRound learns from the float model's inputs (the default);
``--quantized-inputs`` adds each sequence with AdaRound on the quantized model's inputs.
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

SETTINGS = "W4A4-min_max,W4A4-sqnr,W3A16-min_max"
SEQUENCES = "cle,seqmse,adaround;cle,adaround;adaround;seqmse;seqmse,adaround"
SETTING = re.compile(r"W(\d+)A(\d+)(?:-(\w+))?")


def trial_config(overrides: list[str]) -> TrialConfig:
    """The ``TrialConfig`` that ``qat-train <overrides>`` would run (Hydra's real composition)."""
    from hydra import compose, initialize_config_module
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from orchestrator.app_config import register_schemas
    from orchestrator.train.config import SECTIONS

    register_schemas()
    setup_globals()
    with initialize_config_module("orchestrator.conf", version_base="1.3"):
        app = OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)
    return TrialConfig.from_dict({k: app[k] for k in SECTIONS})


def parse_setting(setting: str, scheme_needed: bool) -> tuple[int, int, str | None]:
    match = SETTING.fullmatch(setting)
    if not match or scheme_needed != bool(match[3]):
        form = ("W<bits>A<bits>-<scheme> (e.g. W4A4-sqnr)" if scheme_needed
                else "W<bits>A<bits> (e.g. W4A4; with --calibration-only the schemes come from --schemes)")
        raise SystemExit(f"--settings: {setting!r} is not of the form {form}")
    return int(match[1]), int(match[2]), match[3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overrides", default="", help="Hydra overrides of the trial config, space-separated")
    p.add_argument("--iterations", type=int, default=PtqSpec.adaround_iterations)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--settings", default=SETTINGS,
                   help="W<bits>A<bits>-<scheme> (steps), or with --calibration-only W<bits>A<bits>: W8A8,W4A4,...")
    p.add_argument("--sequences", default=SEQUENCES, help="step sequences, ';'-separated, steps ','-separated")
    p.add_argument("--quantized-inputs", action="store_true",
                   help="also each sequence with AdaRound on the quantized model's inputs")
    p.add_argument("--calibration-only", action="store_true")
    p.add_argument("--schemes", default="min_max,sqnr,percentile", help="with --calibration-only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: a shared 2-core VM does not stall at OpenMP barriers)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = trial_config(args.overrides.split())
    data = build_data(cfg.data)
    checkpoint, meta = pretrained_path(cfg.model, cfg.data, cfg.task, data)
    model = load_pretrained(cfg.model, data, checkpoint)
    task = task_of(cfg.task)
    metric = task.primary
    cpu = torch.device("cpu")
    test = eval_loader(data.test, cfg.qat.eval_batch_size, 0, 1, cpu, data.collate_fn)
    calib = calibration_batches(data.train, 64, args.calibration_batches, 0, data.collate_fn)
    dummy = task.inputs(calib[0])
    fp32 = evaluate(model, test, task, cpu)[metric]
    head = (f"{cfg.model.name} on {cfg.data.name} (FP32 test {metric} {fp32:.2f}), {args.calibration_batches} x 64 "
            f"calibration samples")
    if args.calibration_only:
        calibration_table(cfg, model, task, calib, dummy, test, args, head)
        return
    sequences = [tuple(s.split(",")) for s in args.sequences.split(";")]
    runs = [(s, False) for s in sequences] + ([(s, True) for s in sequences] if args.quantized_inputs else [])
    rows = []
    for setting in args.settings.split(","):
        wbits, abits, scheme = parse_setting(setting, scheme_needed=True)
        name = setting.rsplit("-", 1)[0]
        cfg.quant.param_bw, cfg.quant.output_bw, cfg.quant.quant_scheme = wbits, abits, scheme
        cfg.qat.ptq.adaround_iterations = args.iterations
        for steps, quantized_inputs in runs:
            cfg.qat.init = list(steps)
            cfg.qat.ptq.adaround_quantized_inputs = quantized_inputs
            sim = QuantizationSimModel(model, dummy, cfg.quant_config())
            start = time.perf_counter()
            m = calibrate_with_init(cfg.qat, sim, task, calib, lambda: evaluate(sim.model, test, task, cpu),
                                    lambda msg: None)
            total = time.perf_counter() - start
            note = " (AdaRound on quantized inputs)" if quantized_inputs else ""
            if steps == sequences[0] and not quantized_inputs:  # every prefix of the first sequence
                rows.append((name, scheme, "none (calibration only)", f"{m[f'ptq_plain_{metric}']:.2f}", ""))
                shown = [steps[:i + 1] for i in range(len(steps))]
            else:
                shown = [steps]
            for prefix in shown:
                rows.append((name, scheme, "[" + ",".join(prefix) + "]" + note,
                             f"{m[f'ptq_after_{prefix[-1]}_{metric}']:.2f}",
                             ", ".join(f"{s} {m[f'ptq_{s}_s']:.1f}" for s in prefix)))
            print(f"  {name} {scheme} {list(steps)}{note}: {total:.0f}s", file=sys.stderr, flush=True)
    print(f"PTQ init steps: {head}, AdaRound {args.iterations} iterations/layer, {args.threads} thread(s); "
          f"{machine()}")
    print(table(("setting", "act. calibration", "init steps", f"PTQ test {metric}", "seconds per step"), rows))


def calibration_table(cfg: TrialConfig, model, task, calib, dummy, test, args, head: str) -> None:
    """PTQ test metric per bit setting x activation calibration scheme, and its seconds."""
    cpu = torch.device("cpu")
    rows = []
    metric = task.primary
    for setting in args.settings.split(","):
        cfg.quant.param_bw, cfg.quant.output_bw, _ = parse_setting(setting, scheme_needed=False)
        cfg.qat.init = []
        for scheme in args.schemes.split(","):
            cfg.quant.quant_scheme = scheme
            sim = QuantizationSimModel(model, dummy, cfg.quant_config())
            start = time.perf_counter()
            sim.compute_encodings(lambda m, batches: [task.forward(m, b) for b in batches], calib)
            seconds = time.perf_counter() - start
            value = evaluate(sim.model, test, task, cpu)[metric]
            rows.append((setting, scheme, f"{value:.2f}", f"{seconds:.2f}"))
            print(f"  {setting} {scheme}: {rows[-1][2]}", file=sys.stderr, flush=True)
    print(f"Activation calibration: {head}, {args.threads} thread(s); {machine()}")
    print(table(("setting", "act. calibration", f"PTQ test {metric}", "calibration seconds"), rows))

if __name__ == "__main__":
    main()
