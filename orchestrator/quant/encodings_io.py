"""Reading and writing encodings files in AIMET's JSON layouts (versions 1.0.0, 0.6.1, 2.0.0, 2.1.0).

1.0.0: ``activation_encodings`` / ``param_encodings`` are lists of
``{name, enc_type, dtype, bw, is_sym, scale: [..], offset: [..]}`` (one entry per tensor,
per-channel values as arrays). ``enc_type`` ``PER_BLOCK`` (AIMET's spec: integer weights with
``block_size``; scales flattened row-major from ``[channels, input / block_size]``) adds our
``axis`` (channel axis) and ``block_axis`` (the input axis blocks run along) of that tensor.
Float encodings (FP8/FP4 under a scale, fp16/bf16 casts) are ``dtype: FLOAT`` with ``bw`` as the
spec has them, plus our ``format`` (``float8_e4m3fn``...) and their ``scale`` (offset 0): the
spec's 1.0.0 FLOAT entry has no scale. Dynamic activations have no stored values: they are listed
under our top-level ``dynamic_activation_encodings`` as ``{name, dtype, bw, is_sym, granularity:
PER_TOKEN}`` or, in MX/NVFP4 blocks of the last dim, ``{..., granularity: PER_TOKEN_BLOCK,
block_format: mx | nvfp4, block_size}`` (every version). Readers of AIMET's layout ignore the
fields and the key they do not know.
0.6.1: they are dicts ``{tensor_name: [per-channel
{bitwidth, dtype, is_symmetric, min, max, offset, scale}, ...]}``. Both carry
``quantizer_args`` and ``excluded_layers``. Offsets follow ``x = s * (q + o)``.

LPBQ in 1.0.0 (AIMET's spec): ``enc_type: LPBQ``, ``bw`` the decompressed bit width (elements plus
integer scale bits, 8 for int4), ``compressed_bw`` the elements' bits, ``scale`` the per-channel
float scales, ``offset`` ``-2^(bw-1)`` per channel, ``per_block_int_scale`` flattened channel-major
``[channels, blocks]``. MX and NVFP4 have no 1.0.0 form: ``default_version`` picks 2.1.0 for them.

2.0.0/2.1.0 (AIMET's spec, aligned with ONNX ``QuantizeLinear``): ``{"version", "encodings": [...]}``,
each entry ``{name, output_dtype (int8, uint8, int4, float8e4m3fn, float4e2m1, ...), y_scale,
y_zero_point (omitted when 0), axis (the channel axis; per block: the block axis), block_size}``,
per-block scales nested in the ONNX shape (the tensor's, ``dim / block_size`` on the block axis).
LPBQ: 2.0.0 ``per_block_int_scale`` and ``per_channel_float_scale`` (effective scale = their
product); 2.1.0 ``y_scale = {x: integers, x_scale: per-channel floats, axis: channel axis}``
(the meta encoding). NVFP4: 2.1.0 ``y_scale = {x: e4m3 values, x_scale: per-tensor float,
input_dtype: float8e4m3fn}``; 2.0.0 the effective scales. MX: ``y_scale`` the power-of-two scales.
Our extensions, which spec readers ignore: ``is_param``, ``channel_axis`` (per block),
``block_format`` (``mx``, ``nvfp4``, ``lpbq``), ``source``/``channel_order``, and the top-level
``dynamic_activation_encodings``, ``excluded_layers``, ``quantizer_args``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from .block_formats import ACTIVATION_BLOCK_FORMATS, BLOCK_FORMATS
from .config import MAX_BITWIDTH, MIN_BITWIDTH
from .encoding import AXIS_UNKNOWN, Encoding, symmetric_offset
from .formats import FORMATS
from .errors import EncodingsFileError

ENCODING_VERSIONS = ("1.0.0", "0.6.1", "2.0.0", "2.1.0")
V2 = ("2.0.0", "2.1.0")
NEEDS_V2 = ("mx", "nvfp4")  # two-level schemes that 1.0.0 cannot express
# Block schemes of dynamic activations (granularity.PerTokenBlocks): those of the activation block formats.
DYNAMIC_BLOCK_SCHEMES = tuple(dict.fromkeys(BLOCK_FORMATS[n].granularity.name for n in ACTIVATION_BLOCK_FORMATS))


def default_version(encodings: list[Encoding]) -> str:
    """1.0.0, or 2.1.0 when some encoding is MX or NVFP4."""
    return "2.1.0" if any(e.scheme in NEEDS_V2 for e in encodings) else "1.0.0"


def check_version(version: str) -> str:
    if version not in ENCODING_VERSIONS:
        raise EncodingsFileError(
            f"encoding version {version!r} is not supported; allowed: {', '.join(ENCODING_VERSIONS)}"
        )
    return version


def _channel_major(t: torch.Tensor, axis: int, block_axis: int) -> torch.Tensor:
    """A full-rank per-block tensor as ``[channels, blocks]`` (AIMET's 1.0.0 order)."""
    return t.movedim((axis, block_axis), (0, 1)).reshape(t.shape[axis], t.shape[block_axis])


def _entry_lpbq_1_0_0(name: str, enc: Encoding, source: dict[str, Any] | None) -> dict[str, Any]:
    decompressed = enc.bitwidth + enc.scale_bitwidth
    channels = enc.outer.numel()
    entry = {"name": name, "enc_type": "LPBQ", "dtype": "INT", "bw": decompressed, "compressed_bw": enc.bitwidth,
             "is_sym": True, "block_size": enc.block_size,
             "scale": [float(s) for s in enc.outer.reshape(-1).tolist()],
             "offset": [symmetric_offset(decompressed)] * channels,
             "per_block_int_scale": [int(i) for i in _channel_major(enc.inner, enc.axis, enc.block_axis)
                                     .reshape(-1).tolist()],
             "axis": enc.axis, "block_axis": enc.block_axis}
    entry.update(source or {})
    return entry


def _entry_1_0_0(name: str, enc: Encoding, source: dict[str, Any] | None = None) -> dict[str, Any]:
    if enc.scheme == "lpbq":
        return _entry_lpbq_1_0_0(name, enc, source)
    if enc.scheme in NEEDS_V2:
        raise EncodingsFileError(f"{name}: encoding version 1.0.0 cannot hold {enc.scheme.upper()} encodings; "
                                 f"allowed for them: {', '.join(V2)}")
    is_int = enc.dtype == "int"
    entry = {
        "name": name,
        "enc_type": "PER_BLOCK" if enc.per_block else "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
        "dtype": "INT" if is_int else "FLOAT",
        "bw": enc.bitwidth,
        "is_sym": enc.symmetric,
        "scale": [float(s) for s in enc.scale.reshape(-1).tolist()],
        "offset": [int(o) for o in enc.offset.reshape(-1).tolist()],
    }
    if not is_int:
        entry["format"] = enc.dtype
    if enc.per_channel:
        entry["axis"] = enc.axis
    if enc.per_block:
        entry["block_size"] = enc.block_size
        entry["block_axis"] = enc.block_axis
    if source:
        entry.update(source)
    return entry


ONNX_FLOAT_NAMES = {"float8_e4m3fn": "float8e4m3fn", "float8_e5m2": "float8e5m2", "float4_e2m1": "float4e2m1",
                    "float16": "float16", "bfloat16": "bfloat16"}
FLOAT_FROM_ONNX = {v: k for k, v in ONNX_FLOAT_NAMES.items()}


def _output_dtype(enc: Encoding) -> str:
    if enc.dtype != "int":
        return ONNX_FLOAT_NAMES[enc.dtype]
    return f"{'' if enc.symmetric else 'u'}int{enc.bitwidth}"


def _onnx_shaped(t: torch.Tensor, shape: list[int] | None, block_axis: int) -> list:
    """A full-rank per-block tensor broadcast to ONNX's blocked scale shape (the tensor's shape with
    ``dim / block_size`` on the block axis), as nested lists."""
    if shape is not None and len(shape) == t.dim():
        target = list(shape)
        target[block_axis] = t.shape[block_axis]
        t = t.expand(target)
    return t.tolist()


def _entry_2(name: str, enc: Encoding, version: str, is_param: bool, source: dict[str, Any] | None,
             shape: list[int] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "output_dtype": _output_dtype(enc)}
    if enc.per_block:
        scale = enc.scale.reshape(enc.block_scale_shape(tuple(shape))) if shape and enc.scale.dim() == 1 \
            else enc.scale
        if enc.scheme == "lpbq" and version == "2.0.0":
            entry["per_block_int_scale"] = _int_nested(_onnx_shaped(enc.inner, shape, enc.block_axis))
            entry["per_channel_float_scale"] = enc.outer.tolist()
        elif enc.scheme == "lpbq":
            entry["y_scale"] = {"x": _int_nested(_onnx_shaped(enc.inner, shape, enc.block_axis)),
                                "x_scale": enc.outer.reshape(-1).tolist(), "axis": enc.axis}
        elif enc.scheme == "nvfp4" and version == "2.1.0":
            entry["y_scale"] = {"x": _onnx_shaped(enc.inner, shape, enc.block_axis),
                                "x_scale": float(enc.outer.reshape(())), "input_dtype": "float8e4m3fn"}
        else:
            entry["y_scale"] = _onnx_shaped(scale, shape, enc.block_axis)
        if enc.dtype == "int" and not enc.symmetric:
            entry["y_zero_point"] = _int_nested(_onnx_shaped((-enc.offset.reshape(scale.shape)), shape,
                                                             enc.block_axis))
        entry.update({"axis": enc.block_axis, "block_size": enc.block_size, "channel_axis": enc.axis})
        if enc.scheme:
            entry["block_format"] = enc.scheme
    else:
        scale = enc.scale.reshape(-1)
        zero = (-enc.offset.reshape(-1)).tolist() if enc.dtype == "int" and not enc.symmetric else None
        if enc.per_channel:
            entry["y_scale"] = scale.tolist()
            if zero:
                entry["y_zero_point"] = [int(z) for z in zero]
            entry["axis"] = enc.axis
        else:
            entry["y_scale"] = float(scale[0])
            if zero:
                entry["y_zero_point"] = int(zero[0])
    entry["is_param"] = is_param
    entry.update(source or {})
    return entry


def _int_nested(value):
    return [_int_nested(v) for v in value] if isinstance(value, list) else int(value)


def _dynamic_entry(name: str, enc: Encoding) -> dict[str, Any]:
    blocks = {"granularity": "PER_TOKEN_BLOCK", "block_format": enc.scheme, "block_size": enc.block_size} \
        if enc.per_block else {"granularity": "PER_TOKEN"}
    return {"name": name, "dtype": "INT" if enc.dtype == "int" else "FLOAT", "bw": enc.bitwidth,
            "is_sym": enc.symmetric, **blocks, **({} if enc.dtype == "int" else {"format": enc.dtype})}


def _entries_0_6_1(enc: Encoding) -> list[dict[str, Any]]:
    if enc.per_block or enc.dtype != "int" or enc.dynamic:
        raise EncodingsFileError("encoding version 0.6.1 holds only integer per-tensor/per-channel encodings; "
                                 "allowed for per-block, float or dynamic encodings: 1.0.0")
    return [
        {
            "bitwidth": enc.bitwidth,
            "dtype": "int",
            "is_symmetric": str(enc.symmetric),
            "max": float(mx),
            "min": float(mn),
            "offset": int(o),
            "scale": float(s),
        }
        for s, o, mn, mx in zip(enc.scale.tolist(), enc.offset.tolist(), enc.min.tolist(), enc.max.tolist())
    ]


def encodings_document(
    activations: dict[str, Encoding],
    params: dict[str, Encoding],
    quantizer_args: dict[str, Any],
    excluded_layers: list[str],
    version: str = "1.0.0",
    sources: dict[str, dict[str, Any]] | None = None,
    shapes: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The JSON document for ``activations``/``params`` (tensor name -> encoding).

    1.0.0 entries of per-channel encodings carry ``axis`` (the channel axis of that tensor);
    ``sources`` adds, per param tensor, ``source`` (the parameter it holds) and, when the
    exporter reordered its channels, ``channel_order``. Readers of AIMET's layout ignore them.
    ``shapes``: param tensor shapes, for 2.x's ONNX-shaped per-block scales.
    """
    check_version(version)
    sources = sources or {}
    shapes = shapes or {}
    if version in V2:
        doc = {"version": version,
               "encodings": [_entry_2(n, e, version, False, None, None) for n, e in activations.items()
                             if not e.dynamic] +
                            [_entry_2(n, e, version, True, sources.get(n), shapes.get(n)) for n, e in params.items()],
               "excluded_layers": list(excluded_layers), "quantizer_args": dict(quantizer_args)}
        dynamic = [_dynamic_entry(n, e) for n, e in activations.items() if e.dynamic]
        if dynamic:
            doc["dynamic_activation_encodings"] = dynamic
        return doc
    if version == "1.0.0":
        doc = {
            "version": version,
            "activation_encodings": [_entry_1_0_0(n, e) for n, e in activations.items() if not e.dynamic],
            "param_encodings": [_entry_1_0_0(n, e, sources.get(n)) for n, e in params.items()],
            "excluded_layers": list(excluded_layers),
            "quantizer_args": dict(quantizer_args),
        }
        dynamic = [_dynamic_entry(n, e) for n, e in activations.items() if e.dynamic]
        if dynamic:
            doc["dynamic_activation_encodings"] = dynamic
        return doc
    args = {k: (str(v) if isinstance(v, bool) else v) for k, v in quantizer_args.items()}
    return {
        "version": version,
        "activation_encodings": {n: _entries_0_6_1(e) for n, e in activations.items()},
        "param_encodings": {n: _entries_0_6_1(e) for n, e in params.items()},
        "excluded_layers": list(excluded_layers),
        "quantizer_args": args,
    }


class _Reader:
    """Validates one encodings document, naming the file, the entry and the bad field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, msg: str) -> EncodingsFileError:
        return EncodingsFileError(f"{self.path}: {msg}")

    def bitwidth(self, where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITWIDTH <= value <= MAX_BITWIDTH:
            raise self.fail(f"{where}: bit width {value!r} is not supported; allowed {MIN_BITWIDTH}-{MAX_BITWIDTH}")
        return value

    def numbers(self, where: str, field: str, value: Any, integer: bool) -> list[float]:
        if not isinstance(value, list) or not value:
            raise self.fail(f"{where}: '{field}' must be a non-empty list of numbers, got {value!r}")
        for v in value:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (integer and float(v) != round(float(v))):
                kind = "integers" if integer else "finite numbers"
                raise self.fail(f"{where}: '{field}' must hold {kind}, got {v!r}")
        return [float(v) for v in value]

    def encoding(self, where: str, bw: Any, symmetric: Any, scale: Any, offset: Any, axis: Any = None,
                 per_channel: bool = False, float_format: bool = False) -> Encoding:
        """An encoding; ``per_channel`` without an ``axis`` gets ``AXIS_UNKNOWN``."""
        bw = bw if float_format and bw in (4, 8, 16) else self.bitwidth(where, bw)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or axis < 0):
            raise self.fail(f"{where}: 'axis' must be a non-negative integer, got {axis!r}")
        if axis is None and per_channel:
            axis = AXIS_UNKNOWN
        scales = self.numbers(where, "scale", scale, integer=False)
        offsets = self.numbers(where, "offset", offset, integer=True)
        if len(scales) != len(offsets):
            raise self.fail(f"{where}: {len(scales)} scales but {len(offsets)} offsets")
        if min(scales) <= 0:
            raise self.fail(f"{where}: scale must be > 0, got {min(scales)!r}")
        qmax = (1 << bw) - 1
        bad = [o for o in offsets if not -qmax <= o <= 0]
        if bad:
            raise self.fail(f"{where}: offset {bad[0]!r} is outside [-{qmax}, 0] for {bw} bits")
        return Encoding(bw, bool(symmetric), torch.tensor(scales), torch.tensor(offsets), axis)

    def section_1_0_0(self, doc: dict, key: str) -> dict[str, Encoding]:
        entries = doc.get(key)
        if not isinstance(entries, list):
            raise self.fail(f"'{key}' must be a list in version 1.0.0, got {type(entries).__name__}")
        out = {}
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise self.fail(f"{key}[{i}] must be an object with a string 'name'")
            where = f"{key}[{i}] ({e['name']})"
            missing = [f for f in ("bw", "is_sym", "scale", "offset") if f not in e]
            if missing:
                raise self.fail(f"{where}: missing field(s) {missing}")
            dtype = self.dtype(where, e)
            if not isinstance(e["is_sym"], bool):
                raise self.fail(f"{where}: 'is_sym' must be true or false, got {e['is_sym']!r}")
            enc_type = str(e.get("enc_type", "PER_TENSOR")).upper()
            if enc_type not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ"):
                raise self.fail(f"{where}: enc_type {e.get('enc_type')!r} is not supported; allowed: PER_TENSOR, "
                                "PER_CHANNEL, PER_BLOCK, LPBQ")
            if enc_type == "LPBQ":
                out[e["name"]] = self.lpbq_1_0_0(where, e)
                continue
            enc = self.encoding(where, e["bw"], e["is_sym"], e["scale"], e["offset"], e.get("axis"),
                                enc_type != "PER_TENSOR", float_format=dtype != "int")
            if enc_type == "PER_BLOCK":
                block_size, block_axis = e.get("block_size"), e.get("block_axis", AXIS_UNKNOWN)
                for field, value in (("block_size", block_size), ("block_axis", block_axis)):
                    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and field == "block_size"):
                        raise self.fail(f"{where}: '{field}' must be a positive integer for PER_BLOCK, got {value!r}")
                enc = dataclasses.replace(enc, block_size=block_size, block_axis=block_axis)
            out[e["name"]] = dataclasses.replace(enc, dtype=dtype)
        return out

    def lpbq_1_0_0(self, where: str, e: dict) -> Encoding:
        """AIMET's 1.0.0 LPBQ entry: per-channel ``scale`` and channel-major ``per_block_int_scale``."""
        compressed, decompressed = self.bitwidth(where, e.get("compressed_bw")), self.bitwidth(where, e.get("bw"))
        channel = torch.tensor(self.numbers(where, "scale", e.get("scale"), integer=False))
        ints = torch.tensor(self.numbers(where, "per_block_int_scale", e.get("per_block_int_scale"), integer=True))
        block_size, axis, block_axis = e.get("block_size"), e.get("axis", AXIS_UNKNOWN), e.get("block_axis", 1)
        if not isinstance(block_size, int) or block_size < 1 or ints.numel() % channel.numel():
            raise self.fail(f"{where}: LPBQ needs a positive 'block_size' and per_block_int_scale holding a whole "
                            f"number of blocks per channel ({ints.numel()} for {channel.numel()} channels)")
        ints = ints.reshape(channel.numel(), -1)
        if axis != AXIS_UNKNOWN and axis > block_axis:  # back to the tensor's layout (2-D: [blocks, channels])
            ints, channel = ints.T.contiguous(), channel.reshape(1, -1)
        else:
            channel = channel.reshape(-1, 1)
        scale = (ints * channel).reshape(-1)
        return Encoding(compressed, True, scale, torch.full_like(scale, float(symmetric_offset(compressed))), axis,
                        block_axis=block_axis, block_size=block_size, scheme="lpbq", inner=ints, outer=channel,
                        scale_bitwidth=decompressed - compressed)

    def entries_2(self, doc: dict) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
        """2.0.0/2.1.0 ``encodings`` -> (activations, params) by our ``is_param`` (absent: activation;
        ``qdq.py`` treats an initializer's entry as a param)."""
        entries = doc.get("encodings")
        if not isinstance(entries, list):
            raise self.fail(f"'encodings' must be a list in version {doc.get('version')}, got "
                            f"{type(entries).__name__}")
        acts, params = {}, {}
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise self.fail(f"encodings[{i}] must be an object with a string 'name'")
            (params if e.get("is_param") else acts)[e["name"]] = self.entry_2(f"encodings[{i}] ({e['name']})", e)
        return acts, params

    def entry_2(self, where: str, e: dict) -> Encoding:
        out = str(e.get("output_dtype"))
        if out in FLOAT_FROM_ONNX:
            dtype, bw, symmetric = FLOAT_FROM_ONNX[out], FORMATS[FLOAT_FROM_ONNX[out]].bitwidth, True
        elif out.startswith(("int", "uint")) and out.lstrip("uint").isdigit():
            dtype, bw, symmetric = "int", self.bitwidth(where, int(out.lstrip("uint"))), not out.startswith("u")
        else:
            raise self.fail(f"{where}: output_dtype {e.get('output_dtype')!r} is not supported; allowed: int2-int16, "
                            f"uint2-uint16, {', '.join(FLOAT_FROM_ONNX)}")
        y_scale, block_size = e.get("y_scale"), e.get("block_size")
        axis = e.get("axis")
        inner = outer = None
        scheme = e.get("block_format")
        if "per_block_int_scale" in e:  # 2.0.0 LPBQ
            inner = torch.tensor(e["per_block_int_scale"], dtype=torch.float32)
            outer = torch.tensor(e["per_channel_float_scale"], dtype=torch.float32)  # full rank, 1 on the block axis
            scheme = "lpbq"
        elif isinstance(y_scale, dict):  # 2.1.0 meta encoding: LPBQ (integer x) or NVFP4 (e4m3 x)
            inner = torch.tensor(y_scale.get("x"), dtype=torch.float32)
            x_scale = torch.tensor(y_scale.get("x_scale"), dtype=torch.float32)
            if x_scale.numel() == 1:
                outer, scheme = x_scale.reshape([1] * inner.dim()), scheme or "nvfp4"
            else:
                shape = [1] * inner.dim()
                shape[y_scale.get("axis", 0)] = -1
                outer, scheme = x_scale.reshape(shape), scheme or "lpbq"
        if inner is not None:
            scale = inner * outer
        else:
            try:
                scale = torch.tensor(y_scale, dtype=torch.float32)
            except (TypeError, ValueError):
                raise self.fail(f"{where}: y_scale must be a number, a nested list of numbers or a meta encoding, "
                                f"got {y_scale!r}") from None
        if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise self.fail(f"{where}: y_scale must hold finite numbers > 0")
        channel_axis = e.get("channel_axis")
        if block_size is not None and channel_axis is None:  # AIMET's convention: the axis before the block axis
            channel_axis = axis - 1 if axis else 1
        if block_size is not None:  # back to our full-rank layout: one element on dims the ONNX shape repeats
            index = [slice(None) if d in (axis, channel_axis) else slice(0, 1) for d in range(scale.dim())]
            scale = scale[tuple(index)].contiguous()
            inner = None if inner is None else inner[tuple(index)].contiguous()
            outer = None if outer is None or outer.dim() != scale.dim() else \
                outer[tuple(i if outer.shape[d] > 1 else slice(None) for d, i in enumerate(index))]
        if dtype != "int":
            offset = torch.zeros_like(scale)
        elif symmetric:
            offset = torch.full_like(scale, float(symmetric_offset(bw)))
        else:
            zero = torch.tensor(e.get("y_zero_point", 0), dtype=torch.float32)
            offset = (-zero).expand(scale.shape).contiguous() if zero.numel() == scale.numel() or zero.dim() == 0 \
                else -zero.reshape(scale.shape)
        if block_size is not None:
            return Encoding(bw, symmetric, scale.reshape(-1), offset.reshape(-1), channel_axis, dtype=dtype,
                            block_axis=axis, block_size=block_size, scheme=scheme, inner=inner, outer=outer,
                            scale_bitwidth=bw if scheme == "lpbq" else None)
        per_channel = axis is not None
        return Encoding(bw, symmetric, scale.reshape(-1), offset.reshape(-1), axis if per_channel else None,
                        dtype=dtype)

    def dtype(self, where: str, e: dict) -> str:
        """``"int"`` or the float format of a 1.0.0 entry (``format``; a 16-bit FLOAT without it is float16)."""
        dtype = str(e.get("dtype", "INT")).upper()
        if dtype == "INT":
            return "int"
        if dtype != "FLOAT":
            raise self.fail(f"{where}: dtype {e.get('dtype')!r} is not supported; allowed: INT, FLOAT")
        fmt = e.get("format", "float16" if e.get("bw") == 16 else None)
        if fmt not in FORMATS:
            raise self.fail(f"{where}: FLOAT format {fmt!r} is not supported; allowed: {', '.join(FORMATS)}")
        return fmt

    def dynamic_1_0_0(self, doc: dict) -> dict[str, Encoding]:
        """Dynamic activations (our ``dynamic_activation_encodings``): no stored values."""
        entries = doc.get("dynamic_activation_encodings", [])
        if not isinstance(entries, list):
            raise self.fail(f"'dynamic_activation_encodings' must be a list, got {type(entries).__name__}")
        out = {}
        for i, e in enumerate(entries):
            where = f"dynamic_activation_encodings[{i}]"
            granularity = e.get("granularity") if isinstance(e, dict) else None
            if not isinstance(e, dict) or not isinstance(e.get("name"), str) or \
                    granularity not in ("PER_TOKEN", "PER_TOKEN_BLOCK"):
                raise self.fail(f"{where}: must be an object with a string 'name' and granularity PER_TOKEN or "
                                "PER_TOKEN_BLOCK")
            dtype = self.dtype(where, e)
            bw = FORMATS[dtype].bitwidth if dtype != "int" else self.bitwidth(where, e.get("bw"))
            blocks = {}
            if granularity == "PER_TOKEN_BLOCK":
                scheme, size = e.get("block_format"), e.get("block_size")
                if scheme not in DYNAMIC_BLOCK_SCHEMES or isinstance(size, bool) or not isinstance(size, int) or \
                        size <= 0:
                    raise self.fail(f"{where}: PER_TOKEN_BLOCK needs block_format in "
                                    f"{', '.join(DYNAMIC_BLOCK_SCHEMES)} and a positive integer block_size; got "
                                    f"{scheme!r}, {size!r}")
                blocks = dict(scheme=scheme, block_size=size, block_axis=-1)
            out[e["name"]] = Encoding(bw, bool(e.get("is_sym")), torch.ones(1), torch.zeros(1), None, dtype=dtype,
                                      dynamic=True, **blocks)
        return out

    def section_0_6_1(self, doc: dict, key: str) -> dict[str, Encoding]:
        entries = doc.get(key)
        if not isinstance(entries, dict):
            raise self.fail(f"'{key}' must be an object in version 0.6.1, got {type(entries).__name__}")
        out = {}
        for name, channels in entries.items():
            where = f"{key}[{name!r}]"
            if not isinstance(channels, list) or not channels or not all(isinstance(c, dict) for c in channels):
                raise self.fail(f"{where}: must be a non-empty list of encoding objects")
            missing = [f for f in ("bitwidth", "is_symmetric", "scale", "offset") if f not in channels[0]]
            if missing:
                raise self.fail(f"{where}: missing field(s) {missing}")
            bws = {c.get("bitwidth") for c in channels}
            if len(bws) != 1:
                raise self.fail(f"{where}: channels disagree on bitwidth {sorted(map(str, bws))}")
            sym = channels[0]["is_symmetric"]
            if sym not in ("True", "False", True, False):
                raise self.fail(f"{where}: 'is_symmetric' must be 'True' or 'False', got {sym!r}")
            out[name] = self.encoding(
                where, channels[0]["bitwidth"], sym in ("True", True),
                [c.get("scale") for c in channels], [c.get("offset") for c in channels],
                per_channel=len(channels) > 1,  # 0.6.1 records no axis
            )
        return out


def _load(path: str, reader: "_Reader") -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise reader.fail("no such encodings file") from None
    except IsADirectoryError:
        raise reader.fail("is a directory, not an encodings file") from None
    except UnicodeDecodeError:
        raise reader.fail("not a text file (an encodings file is JSON)") from None
    except OSError as exc:
        raise reader.fail(f"cannot be read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise reader.fail(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def param_sources(path: str | Path) -> dict[str, dict[str, Any]]:
    """Per param tensor name, the ``source`` parameter and ``channel_order`` an export recorded (1.0.0)."""
    doc = _load(str(path), _Reader(str(path)))
    entries = doc.get("encodings" if doc.get("version") in V2 else "param_encodings") if isinstance(doc, dict) \
        else None
    if not isinstance(entries, list):
        return {}
    return {e["name"]: {k: e[k] for k in ("source", "channel_order") if k in e}
            for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str) and "source" in e}


def read_encodings(path: str | Path) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
    """``(activation encodings, param encodings)`` by tensor name; raises ``EncodingsFileError``.

    A per-channel encoding whose channel axis the file does not record has ``axis == AXIS_UNKNOWN``
    (the op consuming the tensor tells, see ``qdq.py``)."""
    path = str(path)
    reader = _Reader(path)
    doc = _load(path, reader)
    if not isinstance(doc, dict):
        raise reader.fail(f"top level must be a JSON object, got {type(doc).__name__}")
    version = doc.get("version")
    if version == "1.0.0":
        acts = reader.section_1_0_0(doc, "activation_encodings")
        acts.update(reader.dynamic_1_0_0(doc))
        return acts, reader.section_1_0_0(doc, "param_encodings")
    if version == "0.6.1":
        return reader.section_0_6_1(doc, "activation_encodings"), reader.section_0_6_1(doc, "param_encodings")
    if version in V2:
        acts, params = reader.entries_2(doc)
        acts.update(reader.dynamic_1_0_0(doc))
        return acts, params
    raise reader.fail(f"version {version!r} is not supported; allowed: {', '.join(ENCODING_VERSIONS)}")
