"""A trial's calibration with its PTQ steps (``qat.init``), each measured.

Plain calibration first (``ptq_plain_<metric>``), then each step in order on the calibration
batches: steps that change weights before calibration (``cle``) are followed by a fresh
calibration of every encoding; the others (``adaround``, ``seqmse``) start from the calibrated
encodings and leave the activation encodings alone. After each step the simulation is
measured (``ptq_after_<step>_<metric>``) and the step's time logged (``ptq_<step>_s``, the
calibration that follows it included). Every rank runs the same steps on the same batches.

Before all that, ``quant.mixed`` may rebuild the simulation at mixed precision (``build_sim``).
After fine-tuning, ``qat.bn_reestimate_batches`` re-estimates kept BatchNorms and folds them
(``bn_reestimate_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..quant import QuantizationSimModel
from ..quant.ptq import STEPS, AdaRoundParams, SeqMseParams
from ..quant.ptq.bn_reestimate import fold, reestimate
from ..quant.ptq.sensitivity import mixed_precision_overrides, render, sensitivity, weight_bits
from ..tasks import Task, to_device
from .config import QatSpec, TrialConfig, TrialConfigError
from .data import calibration_batches


def build_sim(cfg: TrialConfig, model, dummy: Any, task: Task, batches: list,
              log: Callable[[str], None]) -> tuple[QuantizationSimModel, dict[str, float]]:
    """The trial's simulation of ``model``. With ``quant.mixed``: a first simulation is calibrated
    on ``batches`` and each quantizer's sensitivity measured (output SQNR), then the simulation
    is built again with the most sensitive quantizers at ``quant.mixed.high`` bits. Returns the
    simulation and ``{"weight_bits": average weight bit width, "mixed_high_quantizers": count}``
    (empty without ``quant.mixed``). The same on every rank (same batches, same model)."""
    sim = QuantizationSimModel(model, dummy, cfg.quant_config())
    mixed = cfg.quant.mixed
    if not mixed.enabled:
        return sim, {}
    sim.compute_encodings(lambda m, bs: [task.forward(m, b) for b in bs], batches)
    rows = sensitivity(sim, lambda m, b: task.forward(m, b), batches)
    try:
        overrides = mixed_precision_overrides(rows, mixed.high, keep_top_k=mixed.keep_top_k, budget=mixed.budget)
    except ValueError as exc:
        raise TrialConfigError(f"quant.mixed.{exc}") from None
    log("sensitivity (output SQNR in dB with only this quantizer on / all but this one), most sensitive first:\n"
        + render(rows, 10))
    log(f"mixed precision: {len(overrides)} quantizer(s) at {mixed.high} bits ({', '.join(list(overrides)[:5])}"
        f"{', ...' if len(overrides) > 5 else ''}); average weight bits {weight_bits(rows, overrides):.3f}")
    sim = QuantizationSimModel(model, dummy, cfg.quant_config(overrides))
    return sim, {"weight_bits": weight_bits(rows, overrides), "mixed_high_quantizers": float(len(overrides))}


def step_kwargs(name: str, qat: QatSpec) -> dict[str, Any]:
    """The keyword arguments of PTQ step ``name`` from ``qat.ptq``."""
    p = qat.ptq
    if name == "adaround":
        return {"params": AdaRoundParams(iterations=p.adaround_iterations, num_batches=p.num_batches,
                                         batch_size=p.adaround_batch_size, reg=p.adaround_reg, lr=p.adaround_lr,
                                         seed=qat.seed, quantized_inputs=p.adaround_quantized_inputs)}
    if name == "seqmse":
        return {"params": SeqMseParams(candidates=p.seqmse_candidates, num_batches=p.num_batches)}
    return {}


def calibrate_with_init(qat: QatSpec, sim: QuantizationSimModel, task: Task, batches: list,
                        evaluate: Callable[[], dict[str, float]], log: Callable[[str], None]) -> dict[str, float]:
    """Calibrate ``sim`` on ``batches`` and apply ``qat.init``; returns the ``ptq_*`` metrics of
    the steps (empty without steps). ``evaluate()`` measures ``sim.model`` (the test split)."""

    def run(model, batch):
        return task.forward(model, batch)

    def calibrate() -> None:
        sim.compute_encodings(lambda m, bs: [task.forward(m, b) for b in bs], batches)

    calibrate()
    if not qat.init:
        return {}
    metrics = {f"ptq_plain_{k}": v for k, v in evaluate().items()}
    for name in qat.init:
        step = STEPS[name]
        start = time.perf_counter()
        step.apply(sim, run, batches, **step_kwargs(name, qat))
        if step.before_calibration:
            calibrate()
        metrics[f"ptq_{name}_s"] = time.perf_counter() - start
        after = evaluate()
        metrics.update({f"ptq_after_{name}_{k}": v for k, v in after.items()})
        log(f"PTQ step {name}: {task.describe(after)} ({metrics[f'ptq_{name}_s']:.1f}s)")
    return metrics


def reestimate_batchnorms(qat: QatSpec, sim: QuantizationSimModel, task: Task, data, device,
                          log: Callable[[str], None]) -> dict[str, float]:
    """``qat.bn_reestimate_batches`` > 0: re-estimate the BatchNorm statistics of ``sim.model`` on
    that many training batches (the same on every rank), then fold them into their layers.
    Returns ``{"bn_reestimate_s": seconds}`` (empty when off)."""
    if qat.bn_reestimate_batches == 0:
        return {}
    start = time.perf_counter()
    batches = [to_device(b, device) for b in calibration_batches(
        data.train, qat.batch_size, qat.bn_reestimate_batches, qat.seed + 1, data.collate_fn)]
    names = reestimate(sim, lambda m, b: task.forward(m, b), batches)
    folded = fold(sim)
    seconds = time.perf_counter() - start
    log(f"BatchNorm statistics re-estimated on {len(batches)} training batches ({len(names)} BatchNorms, "
        f"{len(folded)} folded, {seconds:.1f}s)")
    return {"bn_reestimate_s": seconds}
