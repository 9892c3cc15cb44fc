"""A trial's calibration with its PTQ steps (``qat.init``), each measured.

Plain calibration first (``ptq_plain_<metric>``), then each step in order on the calibration
batches: steps that change weights before calibration (``cle``) are followed by a fresh
calibration of every encoding; the others (``adaround``, ``seqmse``) start from the calibrated
encodings and leave the activation encodings alone. After each step the simulation is
measured (``ptq_after_<step>_<metric>``) and the step's time logged (``ptq_<step>_s``, the
calibration that follows it included). Every rank runs the same steps on the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..quant import QuantizationSimModel
from ..quant.ptq import STEPS, AdaRoundParams, SeqMseParams
from ..tasks import Task
from .config import QatSpec


def step_kwargs(name: str, qat: QatSpec) -> dict[str, Any]:
    """The keyword arguments of PTQ step ``name`` from ``qat.ptq``."""
    p = qat.ptq
    if name == "adaround":
        return {"params": AdaRoundParams(iterations=p.adaround_iterations, num_batches=p.num_batches,
                                         batch_size=p.adaround_batch_size, reg=p.adaround_reg, lr=p.adaround_lr,
                                         seed=qat.seed)}
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
