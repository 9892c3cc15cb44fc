"""Post-training quantization steps that prepare a simulation for QAT (AIMET's advice: PTQ
techniques first when the quantized model falls far below FP32). One file per technique:

- ``cle.equalize``: cross-layer equalization + high-bias absorption (before calibration);
- ``adaround.adaround``: learned weight rounding, layer by layer (after calibration);
- ``seqmse.seqmse``: weight clipping chosen by each layer's output error (after calibration);
- ``bn_reestimate.reestimate`` / ``fold``: BatchNorm statistics recomputed after QAT, then folded;
- ``sensitivity.sensitivity`` / ``mixed_precision_overrides``: per-quantizer sensitivity and the
  ``QuantConfig.overrides`` that keep the most sensitive quantizers at a higher bit width.

Each works on a ``QuantizationSimModel`` with ``run(sim.model, batch)`` over calibration
``batches``. ``STEPS`` names them for configs: ``before_calibration`` says where each goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .adaround import AdaRoundParams, adaround
from .bn_reestimate import fold, reestimate
from .sensitivity import Sensitivity, mixed_precision_overrides, sensitivity
from .cle import equalize, find_pairs
from .seqmse import SeqMseParams, seqmse


@dataclass(frozen=True)
class Step:
    """A PTQ step by name: ``apply(sim, run, batches, **params)``; ``before_calibration``: it changes
    weights in a way activation encodings must be calibrated after."""

    apply: Callable
    before_calibration: bool
    params: type | None = None


STEPS: dict[str, Step] = {
    "cle": Step(equalize, True),
    "adaround": Step(adaround, False, AdaRoundParams),
    "seqmse": Step(seqmse, False, SeqMseParams),
}

__all__ = ["STEPS", "AdaRoundParams", "SeqMseParams", "Sensitivity", "Step", "adaround", "equalize", "find_pairs",
           "fold", "mixed_precision_overrides", "reestimate", "seqmse", "sensitivity"]
