"""How much of PTQ's loss QAT won back: the one implementation, for trials (which log it) and for
``qat-compare`` (which shows it).

For a task metric ``m`` (``ppl``, lower is better; ``acc``, higher is better) measured on the
test split for the FP32 model (``fp32``), after calibration alone (``ptq``) and after QAT
(``test``):

- ``<m>_ptq_gap`` = ``(good(fp32) - good(ptq)) / |fp32|``: PTQ's loss relative to FP32 (``good``
  flips a lower-is-better metric; 0.086: PTQ is 8.6% worse; negative: PTQ is better);
- ``<m>_recovered`` = ``(good(test) - good(ptq)) / (good(fp32) - good(ptq))``, for perplexity
  ``(ptq_ppl - test_ppl) / (ptq_ppl - fp32_ppl)``: 1 means QAT is back at FP32, 0 at PTQ,
  above 1 better than FP32, below 0 worse than PTQ. Reported only where the gap is at least
  ``MIN_GAP`` (2%): a fraction of a smaller gap is noise.
"""

from __future__ import annotations

import math

MIN_GAP = 0.02  # PTQ must lose at least this fraction of the FP32 metric for a recovered fraction


def ptq_gap(fp32: float, ptq: float, higher_is_better: bool) -> float:
    """PTQ's loss relative to FP32, a fraction (positive: PTQ is worse); NaN when unknown or FP32 is 0."""
    if any(math.isnan(v) for v in (fp32, ptq)) or fp32 == 0:
        return math.nan
    return ((fp32 - ptq) if higher_is_better else (ptq - fp32)) / abs(fp32)


def recovered(fp32: float, ptq: float, test: float, higher_is_better: bool, min_gap: float = MIN_GAP) -> float:
    """The fraction of PTQ's loss that QAT recovered; NaN where PTQ lost less than ``min_gap`` of
    FP32 (or a value is missing)."""
    gap = ptq_gap(fp32, ptq, higher_is_better)
    if math.isnan(gap) or math.isnan(test) or gap < min_gap:
        return math.nan
    return (ptq - test) / (ptq - fp32)


def recovery_metrics(metric: str, fp32: float, ptq: float, test: float, higher_is_better: bool) -> dict[str, float]:
    """``{<metric>_ptq_gap, <metric>_recovered}``, the latter only where the gap is large enough."""
    out = {f"{metric}_ptq_gap": ptq_gap(fp32, ptq, higher_is_better)}
    fraction = recovered(fp32, ptq, test, higher_is_better)
    if not math.isnan(fraction):
        out[f"{metric}_recovered"] = fraction
    return {k: v for k, v in out.items() if not math.isnan(v)}
