"""Per-quantizer sensitivity, and mixed precision chosen from it.

``sensitivity`` measures, for every enabled quantizer of a calibrated simulation (weights by
parameter name, activations by their names in ``sim.summary()``), a score with **only that
quantizer on** and with **all but that one on**. The score is ``metric()`` when given (e.g. test
accuracy: higher is better) or else the output SQNR in dB of ``sim.model`` against the float
model on the calibration batches (``10 log10(sum y^2 / sum (y - y_q)^2)``, all output tensors
together). A quantizer is the more sensitive the worse its only-on score (it alone costs the
most: the lower for ``mode="max"``, a metric where higher is better such as accuracy or SQNR; the
higher for ``mode="min"``, such as perplexity); ties are broken by the better all-but-one score
(turning it off recovers the most). ``quantized_sqnr`` is the SQNR with every quantizer on, the
reference both columns are read against.

``mixed_precision_overrides`` turns a ranking into ``QuantConfig.overrides``: the ``keep_top_k``
most sensitive quantizers at ``high`` bits, or (``budget``) the most sensitive weight quantizers
at ``high`` bits for as long as the average weight bit width (weighted by element count) stays
within ``budget``. A new simulation built with those overrides quantizes (and exports, in its
encodings file) each tensor at its own bit width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from .layers import Run, quantization_off


@dataclass(frozen=True)
class Sensitivity:
    """One quantizer's scores; ``kind`` is ``weight`` or ``activation``, ``numel`` the weight's elements."""

    name: str
    kind: str
    bitwidth: int
    only_on: float
    all_but: float
    numel: int = 0


def _outputs(sim, run: Run, batches: list) -> list[torch.Tensor]:
    with torch.no_grad():
        out = []
        for batch in batches:
            out += [t.detach().float() for t in pytree.tree_leaves(run(sim.model, batch)) if isinstance(t, torch.Tensor)
                    and t.is_floating_point()]
        return out


def sqnr_db(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> float:
    """SQNR in dB of ``quantized`` against ``reference`` (lists of matching tensors)."""
    signal = sum(float(r.square().sum()) for r in reference)
    noise = sum(float((r - q).square().sum()) for r, q in zip(reference, quantized))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def quantized_sqnr(sim, run: Run, batches: list) -> float:
    """SQNR in dB of the calibrated ``sim`` (its quantizers as they are set) against its float
    model, on ``batches`` (all output tensors together)."""
    was_training = sim.model.training
    sim.model.eval()
    try:
        with quantization_off(sim):
            reference = _outputs(sim, run, batches)
        return sqnr_db(reference, _outputs(sim, run, batches))
    finally:
        sim.model.train(was_training)


MODES = ("max", "min")


def sensitivity(sim, run: Run, batches: list, metric: Callable[[], float] | None = None,
                mode: str = "max") -> list[Sensitivity]:
    """Scores of every enabled quantizer of the calibrated ``sim``, most sensitive first (see the
    module docstring). ``run(sim.model, batch)`` runs one batch; ``mode``: ``max`` when a higher
    ``metric()`` is better, ``min`` when a lower one is (the SQNR is ``max``). Costs two
    measurements per quantizer."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; allowed: {', '.join(MODES)}")
    weights = {n: e.quantizer for n, e in sim.quantized_params().items()}
    numels = {n: e.values().numel() for n, e in sim.quantized_params().items()}
    named = [(n, "weight", q) for n, q in weights.items() if q.enabled]
    named += [(n, "activation", q) for n, q in sim.activation_quantizers().items() if q.enabled]
    was_training = sim.model.training
    sim.model.eval()
    try:
        with quantization_off(sim):
            reference = _outputs(sim, run, batches)

        def score() -> float:
            return float(metric()) if metric is not None else sqnr_db(reference, _outputs(sim, run, batches))

        rows = []
        for name, kind, q in named:
            with quantization_off(sim):
                q.enabled = True
                only = score()
            q.enabled = False
            try:
                all_but = score()
            finally:
                q.enabled = True
            rows.append(Sensitivity(name, kind, q.bitwidth, only, all_but, numels.get(name, 0) if kind == "weight" else 0))
    finally:
        sim.model.train(was_training)
    sign = 1.0 if mode == "max" else -1.0
    return sorted(rows, key=lambda r: (sign * r.only_on, -sign * r.all_but))


def weight_bits(rows: list[Sensitivity], overrides: dict[str, dict]) -> float:
    """Average weight bit width, weighted by element count, of ``rows``' weights under ``overrides``
    (an exact name's ``bitwidth``, else the row's own)."""
    weights = [r for r in rows if r.kind == "weight"]
    total = sum(r.numel for r in weights)
    bits = sum(r.numel * overrides.get(r.name, {}).get("bitwidth", r.bitwidth) for r in weights)
    return bits / max(total, 1)


def mixed_precision_overrides(rows: list[Sensitivity], high: int, keep_top_k: int | None = None,
                              budget: float | None = None) -> dict[str, dict[str, int]]:
    """``QuantConfig.overrides`` keeping the most sensitive quantizers of ``rows`` (most sensitive
    first, as ``sensitivity`` returns them) at ``high`` bits: the first ``keep_top_k`` of them, or
    the weights, in order, whose raise keeps the average weight bit width within ``budget``
    (a weight that does not fit is skipped and the next tried). Exactly one of the two."""
    if (keep_top_k is None) == (budget is None):
        raise ValueError("give exactly one of keep_top_k and budget")
    if keep_top_k is not None:
        if keep_top_k < 0:
            raise ValueError(f"keep_top_k={keep_top_k!r} must be an integer >= 0")
        return {r.name: {"bitwidth": high} for r in rows[:keep_top_k] if r.bitwidth < high}
    base = weight_bits(rows, {})
    if budget < base:
        raise ValueError(f"budget={budget!r} is below the weights' average bit width without raises ({base:g})")
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.kind != "weight" or r.bitwidth >= high:
            continue
        trial = {**out, r.name: {"bitwidth": high}}
        if weight_bits(rows, trial) <= budget + 1e-9:
            out = trial
    return out


def render(rows: list[Sensitivity], limit: int | None = None) -> str:
    """``rows`` as a text table, most sensitive first (``limit``: only the first rows); scores with
    3 decimals (a perplexity's differences sit in its third)."""
    shown = rows if limit is None else rows[:limit]
    lines = [f"{'quantizer':<40} {'kind':<10} {'bits':>4} {'only on':>9} {'all but':>9}"]
    lines += [f"{r.name[:40]:<40} {r.kind:<10} {r.bitwidth:>4} {r.only_on:>9.3f} {r.all_but:>9.3f}" for r in shown]
    return "\n".join(lines)
