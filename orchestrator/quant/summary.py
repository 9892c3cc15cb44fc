"""Human-readable summary of a simulation: every quantizer, and exactly what stays float and why."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .build import is_quantizer_key
from .layers import QuantizedModule
from .layers.attention import QuantizedMultiheadAttention
from .layers.recurrent import _QuantizedRNNBase

if TYPE_CHECKING:
    from .sim import QuantizationSimModel


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]


def _weight_rows(sim: QuantizationSimModel) -> list[tuple[str, ...]]:
    rows = [("weight", "bw", "granularity", "encoding")]
    for name, entry in sim.quantized_params().items():
        q = entry.quantizer
        where = q.describe_granularity()
        kind = "learned" if q.learnable else "follows weights"
        if q.calibrated:
            e = q.encoding(entry.values())
            enc = (f"{kind}, scale {_fmt(float(e.scale.min()))}"
                   + (f"..{_fmt(float(e.scale.max()))}" if e.scale.numel() > 1 else ""))
        else:
            enc = f"{kind}, not calibrated"
        tied = f" (tied: {', '.join(entry.names[1:])})" if len(entry.names) > 1 else ""
        bw = str(q.bitwidth) if q.format.name == "int" else q.format.name
        rows.append((name + tied, bw, where, enc + ("" if q.enabled else " (disabled)")))
    return rows


def _activation_rows(sim: QuantizationSimModel) -> list[tuple[str, ...]]:
    rows = [("activation", "bw", "what", "encoding")]
    sources = sim._built.activation_sources
    for name, q in sim.activation_quantizers().items():
        if q.dynamic:
            enc = f"{q.describe_granularity()}: scales from the values at run time"
        elif q.format.name != "int":
            enc = f"{q.format.name}" + ("" if q.cast_only else f", scale {_fmt(float(q.encoding().scale))}"
                                        if q.calibrated else ", not calibrated")
        elif q.calibrated:
            e = q.encoding()
            enc = f"[{_fmt(float(e.min))}, {_fmt(float(e.max))}] scale {_fmt(float(e.scale))} offset {int(e.offset)}"
        else:
            enc = "not calibrated"
        bw = str(q.bitwidth) if q.format.name == "int" else q.format.name
        rows.append((name, bw, sources.get(name, ""), enc + ("" if q.enabled else " (disabled)")))
    return rows


def _float_lines(sim: QuantizationSimModel) -> list[str]:
    built, plan = sim._built, sim._built.plan
    lines = [f"  {name}: {why}" for name, why in built.float_params]
    small = sum(1 for n, p in sim.model.named_parameters() if p.dim() < 2 and not is_quantizer_key(n))
    if small:
        lines.append(f"  {small} parameter tensor(s) of fewer than 2 dims (biases, norm scales and shifts): float "
                     "by contract")
    for leaf in sim.config.leaf_modules:
        lines.append(f"  {leaf}: leaf module, run as written (its weights and intermediate results float, its "
                     "output quantized)")
    lines.extend(f"  {name}: {why}" for name, why in plan.float_outputs)
    for name, module in sim.model.named_modules():
        if isinstance(module, _QuantizedRNNBase):
            lines.append(f"  {name}: gates and cell state inside the recurrence (one fused op)")
        elif isinstance(module, QuantizedMultiheadAttention) and not module.explicit:
            lines.append(f"  {name}: attention internals (bias_k/bias_v/add_zero_attn run as one op)")
    if plan.constant_path:
        shown = ", ".join(sorted(set(plan.constant_path))[:6])
        lines.append(f"  {len(plan.constant_path)} output(s) on mask/constant paths, not activations ({shown}"
                     f"{', ...' if len(set(plan.constant_path)) > 6 else ''})")
    if built.graph.integer_ops:
        lines.append(f"  {built.graph.integer_ops} op call(s) on integer tensors only (position ids, index arithmetic): "
                     "never quantized")
    if plan.pass_through_count:
        lines.append(f"  {plan.pass_through_count} output(s) of data movement (views, reshapes, indexing, dropout, "
                     "max pooling): on their input's grid")
    unswapped = sorted({type(m).__name__ for n, m in sim.model.named_modules()
                        if type(m).__module__.startswith("torch.nn.modules") and not isinstance(m, QuantizedModule)
                        and not isinstance(m, (nn.ModuleDict, nn.ModuleList, nn.Sequential, nn.Identity))
                        and any(True for _ in m.parameters(recurse=False)) and n in built.graph.called})
    if unswapped:
        lines.append(f"  layer types without a registered quantized class (their code quantized op by op): "
                     f"{', '.join(unswapped)}")
    return lines


def _format_text(fmt: str, bits: int) -> str:
    """``4`` for an integer format of 4 bits, else the format's name (``nvfp4``, ``float8_e4m3fn``)."""
    return str(bits) if fmt == "int" else fmt


def render_summary(sim: QuantizationSimModel) -> str:
    cfg = sim.config
    mode = "range learning" if cfg.range_learning else "static activation encodings"
    label = f"W{_format_text(cfg.param_format, cfg.param_bw)}" + (
        f"g{cfg.param_block_size}" if cfg.param_block_size else "")
    if cfg.quantize_activations:
        label += f"A{_format_text(cfg.output_format, cfg.output_bw)}" + (
            " per token" if cfg.output_granularity == "per_token" else "") + (
            " at layer inputs" if cfg.activation_sites == "layer_inputs" else "")
    else:
        label += ", float activations"
    lines = [
        f"QuantizationSimModel of {sim.original_class.__name__}: {label}; calibration: activations "
        f"{cfg.quant_scheme}, weights {cfg.param_quant_scheme} {'per channel' if cfg.per_channel else 'per tensor'}, "
        f"{mode}" + (", weight encodings learned" if cfg.learn_weight_encodings else ""),
    ]
    if sim.folded:
        lines.append("BatchNorm folded: " + ", ".join(f"{p.batchnorm} -> {p.layer}" for p in sim.folded))
    weights = _weight_rows(sim)
    lines.append(f"Weights ({len(weights) - 1}):")
    lines += _table(weights) if len(weights) > 1 else []
    acts = _activation_rows(sim)
    lines.append(f"Activations ({len(acts) - 1}):")
    lines += _table(acts) if len(acts) > 1 else []
    floats = _float_lines(sim)
    if floats:
        lines.append("Stays float:")
        lines += floats
    if sim.export_notes:
        lines.append("Export (last sim.export):")
        lines += [f"  {name}: {note}" for name, note in sim.export_notes]
    return "\n".join(lines)
