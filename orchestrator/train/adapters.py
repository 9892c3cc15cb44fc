"""``qat.lora``: the trial's LoRA adapters on the frozen quantized base (``quant/lora.py``).

Attached after calibration (and ``qat.init``'s PTQ steps), before wrapping and the optimizer, on
every rank alike (the adapters' random ``A`` is drawn from ``qat.seed``), and on the unsharded
simulation that an FSDP trial gathers for its export, so the gathered state loads into it.
"""

from __future__ import annotations

from ..quant import QuantConfigError, QuantizationSimModel, add_lora
from ..quant.lora import ADAPTERS
from .config import QatSpec, TrialConfigError


def attach_lora(qat: QatSpec, sim: QuantizationSimModel) -> QuantizationSimModel:
    """``sim`` with ``qat.lora``'s adapters (unchanged when ``qat.lora.rank`` is 0); errors name ``qat.lora.*``."""
    spec = qat.lora
    if spec.rank == 0:
        return sim
    try:
        add_lora(sim, spec.rank, spec.alpha, tuple(spec.targets), seed=qat.seed)
    except QuantConfigError as exc:
        raise TrialConfigError(f"qat.{exc}") from None
    return sim


def trained_parameters(sim: QuantizationSimModel) -> dict[str, float]:
    """``trained_params``: how many scalars the optimizer updates (model and encodings; counted
    before sharding); ``lora_params``: how many of them are adapters."""
    named = [(n, p) for n, p in sim.model.named_parameters() if p.requires_grad]
    out = {"trained_params": float(sum(p.numel() for _, p in named))}
    lora = sum(p.numel() for n, p in named if ADAPTERS in n.split("."))
    if lora:
        out["lora_params"] = float(lora)
    return out
