"""``sim.load_encodings``: an encodings file back into a simulation, all-or-nothing.

Activation entries are found by the ONNX tensor names an export gives them (quantizer names;
model inputs and outputs by their graph names; ``<name>.call_<k>`` repeats of a layer called
more than once are skipped). Param entries are found by any name of the parameter, or through
the ``source``/``channel_order`` an export recorded for a transposed or reordered copy.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from .encoding import Encoding
from .encodings_io import param_sources, read_encodings
from .errors import EncodingsFileError
from .granularity import PerBlock, PerTokenBlocks

if TYPE_CHECKING:
    from .quantizer import QuantizeDequantize
    from .sim import QuantizationSimModel


def _activation_targets(sim: QuantizationSimModel) -> dict[str, QuantizeDequantize]:
    quantizers = sim.activation_quantizers()
    return {sim.onnx_activation_name(name): q for name, q in quantizers.items()}


def _param_entry(sim, name: str, enc: Encoding, sources: dict) -> tuple[str, Encoding] | None:
    """``(parameter name, encoding in the parameter's channel order)`` for file entry ``name``."""
    by_name = {n: first for first, e in sim.quantized_params().items() for n in e.names}
    if name in by_name and name not in sources:
        return by_name[name], enc
    source = sources.get(name, {})
    param = source.get("source")
    if param not in by_name:
        return None
    order = source.get("channel_order")
    if order is not None:
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        enc = Encoding(enc.bitwidth, enc.symmetric, enc.scale[inverse], enc.offset[inverse], enc.axis)
    return by_name[param], enc


def load_into(sim: QuantizationSimModel, path: str, partial: bool) -> None:
    acts, params = read_encodings(path)
    sources = param_sources(path)
    targets = _activation_targets(sim)
    entries = sim.quantized_params()

    def fail(msg: str) -> EncodingsFileError:
        return EncodingsFileError(f"{path}: {msg}")

    acts = {n: e for n, e in acts.items() if ".call_" not in n or n in targets}
    resolved: dict[str, Encoding] = {}
    unknown = [n for n in acts if n not in targets]
    for name, enc in params.items():
        found = _param_entry(sim, name, enc, sources)
        if found is None:
            unknown.append(name)
        else:
            resolved.setdefault(found[0], found[1])
    if unknown:
        raise fail(f"names {unknown[:5]} are not quantized tensors of this model; known: "
                   f"{sorted(targets)[:3] + sorted(entries)[:3]}...")
    if not partial:
        missing = [n for n, q in targets.items() if n not in acts and q.enabled] + \
                  [n for n, e in entries.items() if n not in resolved and e.quantizer.enabled]
        if missing:
            raise fail(f"no encodings for {missing[:5]} (pass partial=True to load the rest)")
    for name, enc in acts.items():
        q = targets[name]
        if enc.dynamic or q.dynamic:
            g = q.granularity
            blocks = (g.rule.name, g.block_size) if isinstance(g, PerTokenBlocks) else (None, None)
            if not (enc.dynamic and q.dynamic and enc.bitwidth == q.bitwidth and enc.dtype == q.format.name
                    and (enc.scheme, enc.block_size) == blocks):
                kind = f"{enc.scheme.upper()} blocks of {enc.block_size} " if enc.scheme else ""
                raise fail(f"{name}: file has a {'dynamic' if enc.dynamic else 'static'} {kind}{enc.dtype} "
                           f"{enc.bitwidth}-bit "
                           f"encoding; the model's quantizer is {'dynamic' if q.dynamic else 'static'} "
                           f"{q.format.name} {q.bitwidth}-bit {q.describe_granularity()}")
            continue
        if enc.dtype != q.format.name:
            raise fail(f"{name}: file has format {enc.dtype}; the model's quantizer is {q.format.name}")
        if enc.bitwidth != q.bitwidth or enc.symmetric != q.symmetric or enc.per_channel:
            raise fail(f"{name}: file has bw={enc.bitwidth}, is_sym={enc.symmetric}, {enc.scale.numel()} channel(s); "
                       f"the model's quantizer is bw={q.bitwidth}, {'symmetric' if q.symmetric else 'asymmetric'}, "
                       "per tensor")
    for name, enc in resolved.items():
        entry = entries[name]
        q = entry.quantizer
        if enc.bitwidth != q.bitwidth or not enc.symmetric or enc.scale.numel() != q.channels:
            raise fail(f"{name}: file has bw={enc.bitwidth}, is_sym={enc.symmetric}, {enc.scale.numel()} channel(s); "
                       f"the model's quantizer is bw={q.bitwidth}, symmetric, {q.channels} channel(s)")
        blocked = isinstance(q.granularity, PerBlock)
        scheme = q.granularity.name if blocked and q.granularity.name != "per_block" else None
        if enc.dtype != q.format.name or enc.per_block != blocked or enc.scheme != scheme:
            kind = f"{enc.scheme.upper()} " if enc.scheme else "per-block " if enc.per_block else ""
            raise fail(f"{name}: file has a {kind}{enc.dtype} encoding; the model's "
                       f"quantizer is {q.format.name} {q.describe_granularity()}")
        if enc.per_block:
            shape = q.scale_shape if enc.axis == q.axis else q.scale_shape[::-1]  # a transposed copy (2-D)
            scale = enc.scale.reshape(shape)
            enc = dataclasses.replace(enc, scale=scale if enc.axis == q.axis else scale.T)
            resolved[name] = enc
        if not q.learnable and q.needs_calibration:
            expected = q.encoding(entry.values()).scale.reshape(enc.scale.shape)
            if not torch.allclose(enc.scale.float(), expected, rtol=1e-5, atol=0.0):
                worst = float(((enc.scale - expected).abs() / expected).max())
                raise fail(f"{name}: weight scales differ from those of the model's weights (max relative difference "
                           f"{worst:.2e}); load the weights exported with this file")
    for name, enc in acts.items():
        if targets[name].needs_calibration:
            targets[name].set_encoding(enc.scale, enc.offset)
    for name, enc in resolved.items():
        if entries[name].quantizer.learnable:
            entries[name].quantizer.set_encoding(enc.scale)
