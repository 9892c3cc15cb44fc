"""Readable names for sweep trials, from the trial's config and its sweep point.

``w4a4 lr=1e-3 ep=3 RL KD``: bit widths, learning rate, epochs and mode (``RL`` = range learning)
always, ``KD`` when distilling from the FP32 model; any other swept key as ``name=value`` (its
last part, or its last two for the generic words ``enabled``, ``weight``, ``name``, ``args``:
``distill.weight``);
``#n`` (the trial's number) when a grid point repeats (``num_samples > 1``).
"""

from __future__ import annotations

import math
from typing import Any

from ..train.config import TrialConfig
from ..train.labels import bits_label, mode_short

# Swept keys the fixed part of the name already shows.
SHOWN = {"quant", "quant.param_bw", "quant.output_bw", "qat", "qat.lr", "qat.epochs", "qat.range_learning",
         "qat.distill.enabled"}


def short_number(value: Any) -> str:
    """``0.001`` -> ``1e-3``, ``0.00032`` -> ``3.2e-4``, ``0.05`` -> ``0.05``, ``3`` -> ``3``."""
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, float):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    if -3 < exponent < 4:
        return f"{value:.3g}"
    mantissa = f"{value / 10 ** exponent:.2f}".rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def trial_run_name(cfg: TrialConfig, point: dict[str, Any], number: int | None = None) -> str:
    parts = [bits_label(cfg), f"lr={short_number(float(cfg.qat.lr))}", f"ep={cfg.qat.epochs}", mode_short(cfg)]
    if cfg.qat.distill.enabled:
        parts.append("KD")
    for key, value in point.items():
        key = key.lstrip("+~")
        if key not in SHOWN:
            words = key.split(".")
            label = ".".join(words[-2:]) if words[-1] in ("enabled", "weight", "name", "args") else words[-1]
            parts.append(f"{label}={short_number(value)}")
    if number is not None:
        parts.append(f"#{number}")
    return " ".join(parts)
