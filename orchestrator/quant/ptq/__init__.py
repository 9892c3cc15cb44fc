"""Post-training quantization steps that prepare a simulation for QAT (AIMET's advice: PTQ
techniques first when the quantized model falls far below FP32). One file per technique:

- ``cle.equalize``: cross-layer equalization + high-bias absorption (before calibration);
- ``adaround.adaround``: learned weight rounding, layer by layer (after calibration);
- ``seqmse.seqmse``: weight clipping chosen by each layer's output error (after calibration).

Each works on a ``QuantizationSimModel`` with ``run(sim.model, batch)`` over calibration
``batches``. ``STEPS`` names them for configs: ``before_calibration`` says where each goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .adaround import AdaRoundParams, adaround
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

__all__ = ["STEPS", "AdaRoundParams", "SeqMseParams", "Step", "adaround", "equalize", "find_pairs", "seqmse"]
