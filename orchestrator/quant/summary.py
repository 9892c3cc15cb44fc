"""Human-readable summary of a simulation: every quantizer, where it sits, its encoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .modules import FLOAT_CLASS

if TYPE_CHECKING:
    from .sim import QuantizationSimModel


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def render_summary(sim: QuantizationSimModel) -> str:
    cfg = sim.config
    mode = "range learning" if cfg.range_learning else "static activation encodings"
    lines = [
        f"QuantizationSimModel of {sim.original_class.__name__}: W{cfg.param_bw}A{cfg.output_bw}, "
        f"scheme {cfg.quant_scheme}, {mode}, "
        f"weights {'per-channel' if cfg.per_channel else 'per-tensor'}"
        + (", weight encodings learned" if cfg.learn_weight_encodings else ""),
    ]
    if sim.folded:
        lines.append("BatchNorm folded: " + ", ".join(f"{p.batchnorm} -> {p.layer}" for p in sim.folded))
    rows = [("quantizer", "on", "bw", "encoding")]
    for site in sim.sites:
        q = sim.activation_quantizers()[site.name]
        if q.calibrated:
            e = q.encoding()
            enc = f"[{_fmt(float(e.min))}, {_fmt(float(e.max))}] scale {_fmt(float(e.scale))} offset {int(e.offset)}"
        else:
            enc = "not calibrated"
        rows.append((site.name, f"output of {site.op}" if site.op != "model input" else "model input",
                     str(q.bitwidth), enc + ("" if q.enabled else " (disabled)")))
    for name, layer in sim.weight_layers().items():
        wq = layer.weight_quantizer
        if wq.calibrated:
            e = wq.encoding(layer.weight)
            enc = (f"symmetric, {e.scale.numel()} channel(s), scale {_fmt(float(e.scale.min()))}"
                   + (f"..{_fmt(float(e.scale.max()))}" if e.scale.numel() > 1 else ""))
        else:
            enc = "not calibrated"
        rows.append((sim.param_name(name), f"weight of {FLOAT_CLASS[type(layer)].__name__}", str(wq.bitwidth), enc))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    if sim.unquantized:
        lines.append("Not quantized:")
        lines.extend(f"  {note}" for note in sim.unquantized)
    return "\n".join(lines)
