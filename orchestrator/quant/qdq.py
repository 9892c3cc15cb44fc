"""An independent check of an export: apply the encodings to the float ONNX graph and run it.

``build_qdq_model(onnx_path, encodings_path)`` inserts ``QuantizeLinear -> DequantizeLinear``
on every tensor the encodings file names (activations: graph tensors; params: initializers,
per channel on the entry's ``axis``, or, where the file does not record it, on the axis the
consuming op defines: Conv/Gather 0, ConvTranspose 1, MatMul's B the last, Gemm's B by
``transB``, LSTM/GRU/RNN W/R 1). It reads only the two exported files, never the simulation,
so agreement between onnxruntime on this model and ``sim.model`` shows the export is right.
Inputs are fed in the dtype the graph declares (token ids as int64).

Integer containers: asymmetric encodings use uint8 (b <= 8) or uint16 (b <= 16) with
``zero_point = -offset``; symmetric ones int8/int16 with zero point 0. For bit widths other
than 8 and 16, the tensor is first clipped to the encoding's ``[min, max]`` (``Max``/``Min``
nodes), which makes the container's saturation act as the b-bit grid's clamp.

Per-block weights: opset-21 blocked ``QuantizeLinear``/``DequantizeLinear`` (``axis`` = the
block axis, ``block_size``; the scale has the weight's shape but ``dim / block_size`` on that
axis, as ONNX requires), in an int4 container for 4 bits (no clip needed), else as above.
Float formats: FP8 ``QuantizeLinear`` to ``float8e4m3fn``/``float8e5m2`` (saturating, round to
nearest even); fp16/bf16 casts as ``Cast`` there and back.
Two-level blocks: LPBQ as AIMET's graph, ``DequantizeLinear(integer block scales as uint8,
per-channel float scale)`` feeding the blocked int4 ``QuantizeLinear``/``DequantizeLinear`` as its
scale; MXFP8/MXINT8 as blocked float8/int8 Q/DQ with the power-of-two scales; NVFP4's scale is its
effective ``x_scale * x`` (what ``DequantizeLinear`` of the meta encoding gives, in float32).
onnxruntime has no FP4 (e2m1) ``QuantizeLinear`` kernel (opset 21 or 23): a weight in FP4 (MXFP4,
NVFP4, per channel) is quantized by ONNX's own numpy reference implementation
(``onnx.reference``, opset 23 ``QuantizeLinear``/``DequantizeLinear``), and onnxruntime runs the graph
with the dequantized weight as its initializer; ``notes`` (and a one-line warning) say so. Static
FP4 activations cannot be checked so and are refused in one line.
Dynamic per-token activations: the reference arithmetic as ONNX ops (``ReduceMin``/``ReduceMax``
over the last axis, the scale and offset of ``asymmetric_from_range``, ``Div``, ``Round``,
``Max``/``Min``, ``Mul``), which compute exactly what the simulation computes.
Dynamic MX/NVFP4 activations (blocks of the last dim): the tensor zero-padded to a multiple of the
block (``Pad``; a partial last block, as the simulation pads it) as ``[-1, B]`` rows, each row's
largest magnitude, the format's scale rule as ONNX ops (MX: ``floor(log2 amax)`` from ``Log``
corrected by exact powers of two, ``Pow(2, X)``; NVFP4: the per-tensor scale and the e4m3 block
scale through a float8 ``QuantizeLinear``/``DequantizeLinear``), ``Div``, the element rounding
(float8: ``QuantizeLinear``/``DequantizeLinear`` at scale 1; e2m1: ``Round`` of ``|y|`` on its grid
step 0.5/1/2, exact since the steps are powers of two; int8: ``Round`` and ``Clip``), ``Mul``,
reshaped back: onnxruntime runs every op, FP4 included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .encoding import AXIS_UNKNOWN, Encoding
from .encodings_io import read_encodings
from .errors import EncodingsFileError, QuantFileError

QDQ_OPSET = 21


FLOAT_CONTAINERS = {"float8_e4m3fn": TensorProto.FLOAT8E4M3FN, "float8_e5m2": TensorProto.FLOAT8E5M2}
NO_ORT_KERNEL = {"float4_e2m1": TensorProto.FLOAT4E2M1}  # applied by onnx.reference instead
REFERENCE_OPSET = 23
CASTS = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def _container(enc: Encoding) -> tuple[int, np.dtype, np.ndarray]:
    """ONNX type, numpy type and zero point ``[C]`` holding ``enc``'s integers."""
    if enc.per_block and enc.bitwidth == 4:
        if enc.symmetric:
            return TensorProto.INT4, np.int8, np.zeros(enc.scale.numel(), dtype=np.int8)
        return TensorProto.UINT4, np.uint8, (-enc.offset.reshape(-1).numpy()).astype(np.uint8)
    wide = enc.bitwidth > 8
    if enc.symmetric:
        dtype = np.int16 if wide else np.int8
        zero = np.zeros(enc.scale.numel(), dtype=dtype)
        return (TensorProto.INT16 if wide else TensorProto.INT8), dtype, zero
    dtype = np.uint16 if wide else np.uint8
    zero = (-enc.offset.reshape(-1).numpy()).astype(dtype)
    return (TensorProto.UINT16 if wide else TensorProto.UINT8), dtype, zero


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.new_nodes: list[onnx.NodeProto] = []
        self.n = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def qdq(self, source: str, target: str, enc: Encoding, axis: int | None, rank: int,
            dims: list[int] | None = None) -> None:
        """Nodes computing ``target = DQ(Q(clip(source)))``, per channel on ``axis`` when it is not None
        (per block: ``axis`` is the channel axis, ``enc.block_axis`` the block axis, ``dims`` the shape)."""
        tag = f"qdq{self.n}"
        self.n += 1
        if enc.dynamic and enc.per_block:
            return self.dynamic_blocks(source, target, enc, tag)
        if enc.dynamic:
            return self.dynamic_per_token(source, target, enc, tag)
        if enc.dtype in CASTS:
            self.new_nodes.append(helper.make_node("Cast", [source], [f"{tag}_h"], to=CASTS[enc.dtype],
                                                   name=f"{tag}_C"))
            self.new_nodes.append(helper.make_node("Cast", [f"{tag}_h"], [target], to=TensorProto.FLOAT,
                                                   name=f"{tag}_F"))
            return
        if enc.dtype != "int" and enc.dtype not in FLOAT_CONTAINERS:
            raise EncodingsFileError(f"{source}: onnxruntime has no QuantizeLinear for {enc.dtype} at opset "
                                     f"{QDQ_OPSET}; allowed float formats: {', '.join([*FLOAT_CONTAINERS, *CASTS])}")
        per_channel = axis is not None
        scale = enc.scale.numpy().astype(np.float32)
        if enc.dtype != "int":
            ztype, zero = FLOAT_CONTAINERS[enc.dtype], None  # a float8 zero point of 0
        else:
            ztype, _, zero = _container(enc)
        attrs = {"axis": axis} if per_channel else {}
        x = source
        if enc.per_block:
            bshape = list(enc.block_scale_shape(tuple(dims)))
            full = list(dims)
            full[enc.block_axis] = bshape[enc.block_axis]
            scale = np.ascontiguousarray(np.broadcast_to(scale.reshape(bshape), full))
            if enc.dtype == "int":
                zero = np.ascontiguousarray(np.broadcast_to(zero.reshape(bshape), full))
            attrs = {"axis": enc.block_axis, "block_size": enc.block_size}
        elif not per_channel:
            scale = scale.reshape(())
        if enc.dtype == "int" and enc.bitwidth not in (8, 16) and not (enc.per_block and enc.bitwidth == 4):
            lo, hi = enc.min.numpy().astype(np.float32), enc.max.numpy().astype(np.float32)
            if enc.per_block:
                lo = np.repeat(np.broadcast_to(lo.reshape(bshape), full), enc.block_size, axis=enc.block_axis)
                hi = np.repeat(np.broadcast_to(hi.reshape(bshape), full), enc.block_size, axis=enc.block_axis)
            else:
                shape = tuple(-1 if d == axis else 1 for d in range(rank)) if per_channel else ()
                lo, hi = lo.reshape(shape), hi.reshape(shape)
            lo_name, hi_name = self.const(f"{tag}_min", lo), self.const(f"{tag}_max", hi)
            self.new_nodes.append(helper.make_node("Max", [x, lo_name], [f"{tag}_lo"], name=f"{tag}_Max"))
            self.new_nodes.append(helper.make_node("Min", [f"{tag}_lo", hi_name], [f"{tag}_clip"], name=f"{tag}_Min"))
            x = f"{tag}_clip"
        s_name = self.const(f"{tag}_scale", scale)
        if enc.scheme == "lpbq":  # the scale as AIMET's graph computes it: DQ(integers, per-channel scale)
            graph_inits = self.graph.initializer
            graph_inits.remove(next(i for i in graph_inits if i.name == s_name))
            ints = np.ascontiguousarray(np.broadcast_to(enc.inner.numpy().reshape(bshape), full)).astype(np.uint8)
            channel = enc.outer.numpy().astype(np.float32).reshape(-1)
            self.const(f"{tag}_int_scale", ints)
            self.const(f"{tag}_channel_scale", channel)
            self.new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_int_scale", f"{tag}_channel_scale"],
                                                   [s_name], name=f"{tag}_scale_DQ", axis=axis))
        z_name = f"{tag}_zero_point"
        zshape = list(scale.shape)
        if enc.dtype == "int" and ztype not in (TensorProto.INT4, TensorProto.UINT4):
            self.const(z_name, np.asarray(zero).reshape(zshape))
        else:  # int4 and float8 zero points: written through helper.make_tensor (no numpy dtype)
            values = np.asarray(zero).reshape(-1).astype(np.int64).tolist() if enc.dtype == "int" else \
                [0.0] * int(np.prod(zshape, dtype=np.int64))
            self.graph.initializer.append(helper.make_tensor(z_name, ztype, zshape, values))
        self.new_nodes.append(helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{tag}_q"],
                                               name=f"{tag}_Q", **attrs))
        self.new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", s_name, z_name], [target],
                                               name=f"{tag}_DQ", **attrs))

    def dynamic_per_token(self, source: str, target: str, enc: Encoding, tag: str) -> None:
        """``target`` = the simulation's per-token quantization of ``source`` (asymmetric integer grid).

        ``lo, hi = min(min_t x, 0), max(max_t x, 0)`` per token, ``s = max((hi - lo) / qmax, eps)``,
        ``o = clip(round(lo / s), -qmax, 0)``, ``target = s * min(max(round(x / s), o), o + qmax)``."""
        if enc.dtype != "int" or enc.symmetric:
            raise EncodingsFileError(f"{source}: dynamic per-token encodings are applied for asymmetric integer "
                                     f"grids only; got {enc.dtype}, is_sym={enc.symmetric}")
        from .encoding import SCALE_FLOOR, qmax_of

        qmax = float(qmax_of(enc.bitwidth))
        c = {k: self.const(f"{tag}_{k}", np.array(v, np.float32)) for k, v in
             (("zero", 0.0), ("qmax", qmax), ("nqmax", -qmax), ("eps", SCALE_FLOOR))}
        axes = self.const(f"{tag}_axes", np.array([-1], np.int64))
        n = self.new_nodes

        def node(op: str, inputs: list[str], out: str, **attrs) -> str:
            n.append(helper.make_node(op, inputs, [f"{tag}_{out}"], name=f"{tag}_{out}_{op}", **attrs))
            return f"{tag}_{out}"

        lo = node("Min", [node("ReduceMin", [source, axes], "rmin", keepdims=1), c["zero"]], "lo")
        hi = node("Max", [node("ReduceMax", [source, axes], "rmax", keepdims=1), c["zero"]], "hi")
        scale = node("Max", [node("Div", [node("Sub", [hi, lo], "span"), c["qmax"]], "s0"), c["eps"]], "scale")
        off = node("Min", [node("Max", [node("Round", [node("Div", [lo, scale], "lo_s")], "lo_r"), c["nqmax"]],
                                "o0"), c["zero"]], "offset")
        top = node("Add", [off, c["qmax"]], "top")
        r = node("Round", [node("Div", [source, scale], "u")], "r")
        clipped = node("Min", [node("Max", [r, off], "r_lo"), top], "c")
        n.append(helper.make_node("Mul", [clipped, scale], [target], name=f"{tag}_out_Mul"))

    def dynamic_blocks(self, source: str, target: str, enc: Encoding, tag: str) -> None:
        """``target`` = the simulation's dynamic MX/NVFP4 block quantization of ``source`` (blocks of
        ``enc.block_size`` along the last dim; ``block_scales.py``'s rules, module docstring)."""
        from .block_scales import E8M0_MAX_EXPONENT, E8M0_MIN_EXPONENT, MXINT8_UNIT_EXPONENT, NVFP4_ELEMENT, \
            NVFP4_SCALE, NVFP4_SCALE_MIN, element_max_exponent
        from .formats import FORMATS, IntFormat

        fmt = FORMATS.get(enc.dtype, IntFormat(enc.bitwidth, True))
        n = self.new_nodes

        def node(op: str, inputs: list[str], out: str, **attrs) -> str:
            n.append(helper.make_node(op, inputs, [f"{tag}_{out}"], name=f"{tag}_{out}_{op}", **attrs))
            return f"{tag}_{out}"

        def f32(key: str, value: float) -> str:
            return self.const(f"{tag}_{key}", np.array(value, np.float32))

        def i64(key: str, value: list[int]) -> str:
            return self.const(f"{tag}_{key}", np.array(value, np.int64))

        def as_float(x: str, out: str) -> str:  # a float8 round trip at scale 1 (saturating, ties to even)
            scale, zero = f32(f"{out}_one", 1.0), f"{tag}_{out}_zero"
            ftype = FLOAT_CONTAINERS[fmt.name if out == "elem" else NVFP4_SCALE.name]
            self.graph.initializer.append(helper.make_tensor(zero, ftype, [], [0.0]))
            return node("DequantizeLinear", [node("QuantizeLinear", [x, scale, zero], f"{out}_q"), scale, zero], out)

        # A partial last block zero-padded: pads = [0] * (2 * rank - 1) + [(-K) mod B]
        shape = node("Shape", [source], "shape")
        size, block = node("Gather", [shape, i64("last", [-1])], "dim"), i64("block", [enc.block_size])
        pad = node("Mod", [node("Sub", [block, node("Mod", [size, block], "rem")], "gap"), block], "pad")
        n_zeros = node("Reshape", [node("Sub", [node("Mul", [node("Size", [shape], "rank"), i64("two_i", 2)], "r2"),
                                               i64("one_i", 1)], "r21"), i64("one_d", [1])], "nz")
        zeros = node("ConstantOfShape", [n_zeros], "zeros", value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
        padded = node("Pad", [source, node("Concat", [zeros, pad], "pads", axis=0)], "xp")
        rows = node("Reshape", [padded, node("Concat", [i64("rows", [-1]), block], "rshape", axis=0)], "x")
        amax = node("ReduceMax", [node("Abs", [rows], "abs"), i64("axes", [1])], "amax", keepdims=1)
        positive = node("Greater", [amax, f32("zero", 0.0)], "pos")
        if enc.scheme == "mx":  # X = floor(log2 amax) - emax, exact: Log's guess corrected by powers of two
            a = node("Where", [positive, amax, f32("one", 1.0)], "a")
            two = f32("two", 2.0)
            e0 = node("Floor", [node("Div", [node("Log", [a], "ln"), f32("ln2", float(np.log(2.0)))], "l2")], "e0")
            p = node("Pow", [two, e0], "p")
            over = node("Cast", [node("Greater", [p, a], "gt")], "over", to=TensorProto.FLOAT)
            under = node("Cast", [node("LessOrEqual", [node("Mul", [p, two], "p2"), a], "le")], "under",
                         to=TensorProto.FLOAT)
            e = node("Add", [node("Sub", [e0, over], "e1"), under], "e")
            e = node("Where", [positive, e, f32("emin", float(E8M0_MIN_EXPONENT))], "e_or_min")
            x_exp = node("Clip", [node("Sub", [e, f32("emax", float(element_max_exponent(fmt)))], "x0"),
                                  f32("xlo", float(E8M0_MIN_EXPONENT)), f32("xhi", float(E8M0_MAX_EXPONENT))], "X")
            unit = MXINT8_UNIT_EXPONENT if isinstance(fmt, IntFormat) else 0
            scale = node("Pow", [two, node("Add", [x_exp, f32("unit", float(unit))], "xu")], "scale")
        elif enc.scheme == "nvfp4":  # s_t per tensor, e4m3 block scales under it
            t_amax = node("ReduceMax", [node("Abs", [source], "tabs")], "tamax", keepdims=0)
            t_pos = node("Greater", [t_amax, f32("tzero", 0.0)], "tpos")
            per_tensor = node("Where", [t_pos, node("Div", [t_amax, f32("tmax", NVFP4_SCALE.max * NVFP4_ELEMENT.max)],
                                                    "t0"), f32("tone", 1.0)], "st")
            b0 = node("Div", [node("Div", [amax, f32("emax", NVFP4_ELEMENT.max)], "b6"), per_tensor], "b0")
            q = as_float(node("Clip", [b0, f32("qlo", NVFP4_SCALE_MIN), f32("qhi", NVFP4_SCALE.max)], "bc"), "bq")
            scale = node("Mul", [per_tensor, q], "scale")
        else:
            raise EncodingsFileError(f"{source}: dynamic block format {enc.scheme!r} is not known; allowed: mx, nvfp4")
        y = node("Div", [rows, scale], "y")
        if isinstance(fmt, IntFormat):  # MXINT8: round half to even, clamp to the symmetric int8 grid
            half = float(1 << (fmt.bitwidth - 1))
            c = node("Clip", [node("Round", [y], "r"), f32("clo", -half), f32("chi", half - 1)], "c")
        elif fmt.name in FLOAT_CONTAINERS:
            c = as_float(y, "elem")
        else:  # e2m1: |y| clamped to 6, rounded on its grid step (0.5 below 2, 1 below 4, else 2)
            a = node("Min", [node("Abs", [y], "ya"), f32("m", fmt.max)], "yc")
            step = node("Where", [node("Less", [a, f32("s2", 2.0)], "lt2"), f32("h", 0.5),
                                  node("Where", [node("Less", [a, f32("s4", 4.0)], "lt4"), f32("o1", 1.0),
                                                 f32("o2", 2.0)], "st4")], "step")
            mag = node("Mul", [node("Round", [node("Div", [a, step], "u")], "ur"), step], "mag")
            c = node("Mul", [mag, node("Sign", [y], "sg")], "c")
        back = node("Reshape", [node("Mul", [c, scale], "out"), node("Shape", [padded], "pshape")], "back")
        n.append(helper.make_node("Slice", [back, i64("start", [0]), size, i64("last_axis", [-1])], [target],
                                  name=f"{tag}_unpad"))

    def rewire(self, old: str, new: str) -> None:
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


# (op type, input index) -> channel axis of a per-channel weight fed there (-1: the last axis).
CONSUMER_AXIS = {("Conv", 1): 0, ("ConvTranspose", 1): 1, ("Gather", 0): 0, ("MatMul", 1): -1, ("LSTM", 1): 1,
                 ("LSTM", 2): 1, ("GRU", 1): 1, ("GRU", 2): 1, ("RNN", 1): 1, ("RNN", 2): 1}


def _block_axes(name: str, enc: Encoding, axis: int, dims: list[int], path) -> Encoding:
    """A per-block encoding with its block axis (recorded, else the other axis of a 2-D weight), checked."""
    block_axis = enc.block_axis
    if block_axis == AXIS_UNKNOWN:
        if len(dims) != 2:
            raise EncodingsFileError(f"{path}: {name}: per-block encoding without 'block_axis' on a {len(dims)}-D "
                                     "tensor; allowed: a recorded block_axis, or a 2-D tensor")
        block_axis = 1 - axis
    enc = dataclasses.replace(enc, axis=axis, block_axis=block_axis)
    if not 0 <= block_axis < len(dims) or block_axis == axis or dims[block_axis] % enc.block_size or \
            enc.scale.numel() != dims[axis] * dims[block_axis] // enc.block_size:
        raise EncodingsFileError(f"{path}: {name}: {enc.scale.numel()} block scale(s) (axis {axis}, block axis "
                                 f"{block_axis}, block_size {enc.block_size}) do not fit the tensor's shape {dims}")
    return enc


def _param_axis(graph: onnx.GraphProto, name: str, enc: Encoding, dims: list[int], path) -> int:
    """The channel axis of a per-channel param encoding: as recorded, else from the ops that consume it."""
    channels = enc.scale.numel()
    if enc.per_block:  # the channel count: scales / blocks per channel are unknown until the axes are
        channels = None
    if enc.axis != AXIS_UNKNOWN:
        axis = enc.axis
    else:
        axes = set()
        for node in graph.node:
            for i, inp in enumerate(node.input):
                if inp != name:
                    continue
                if node.op_type == "Gemm" and i == 1:
                    trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    axes.add(0 if trans else 1)
                elif (node.op_type, i) in CONSUMER_AXIS:
                    axes.add(CONSUMER_AXIS[(node.op_type, i)] % len(dims))
        matching = [d for d, size in enumerate(dims) if size == channels and channels is not None]
        axis = axes.pop() if len(axes) == 1 else (matching[0] if len(matching) == 1 else None)
        if axis is None:
            raise EncodingsFileError(f"{path}: {name}: per-channel encoding without an axis, and the ops consuming "
                                     "it do not tell which axis holds its channels")
    if not 0 <= axis < len(dims) or (channels is not None and dims[axis] != channels):
        raise EncodingsFileError(f"{path}: {name}: {channels} channel encoding(s) on axis {axis}, but the tensor "
                                 f"has shape {dims}")
    return axis


def _load_model(onnx_path: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(onnx_path))
    except FileNotFoundError:
        raise QuantFileError(f"{onnx_path}: no such ONNX file") from None
    except OSError as exc:
        raise QuantFileError(f"{onnx_path}: cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX model
        raise QuantFileError(f"{onnx_path}: not a valid ONNX model ({type(exc).__name__})") from None


def build_qdq_model(onnx_path: str | Path, encodings_path: str | Path) -> onnx.ModelProto:
    """The ONNX model of ``onnx_path`` with the encodings of ``encodings_path`` applied as QDQ."""
    model, _ = build_qdq_model_with_notes(onnx_path, encodings_path)
    return model


def build_qdq_model_with_notes(onnx_path: str | Path, encodings_path: str | Path) -> tuple[onnx.ModelProto, list[str]]:
    """``build_qdq_model`` and one line per tensor that onnxruntime's kernels could not quantize."""
    model = _load_model(onnx_path)
    acts, params = read_encodings(encodings_path)
    notes: list[str] = []
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {i.name for i in graph.input}
    inits = {i.name: i for i in graph.initializer}
    for name in [n for n in acts if n in inits and n not in producers]:  # 2.x lists params with activations
        params[name] = acts.pop(name)
    fp4 = [n for n, e in acts.items() if e.dtype in NO_ORT_KERNEL and not e.dynamic]
    if fp4:
        raise EncodingsFileError(f"{encodings_path}: onnxruntime has no QuantizeLinear for "
                                 f"{acts[fp4[0]].dtype} (activation {fp4[0]!r}); allowed activation formats: int, "
                                 f"{', '.join([*FLOAT_CONTAINERS, *CASTS])}")
    missing = [n for n in acts if n not in producers and n not in inputs and n not in inits] + \
        [n for n in params if n not in inits]
    if missing:
        raise EncodingsFileError(f"{encodings_path}: tensors {missing[:5]} are not in {onnx_path}")
    b = _Builder(model)
    for name, enc in acts.items():
        if name in producers:  # rename the producer's output; the QDQ output takes the name
            node = producers[name]
            raw = f"{name}__float"
            node.output[list(node.output).index(name)] = raw
            b.qdq(raw, name, enc, None, 0)
        else:  # a graph input: consumers read the quantized copy
            b.rewire(name, f"{name}__qdq")
            b.qdq(name, f"{name}__qdq", enc, None, 0)
    for name, enc in params.items():
        dims = list(inits[name].dims)
        axis = _param_axis(graph, name, enc, dims, encodings_path) if enc.per_channel else None
        if enc.per_block:
            enc = _block_axes(name, enc, axis, dims, encodings_path)
        if enc.dtype in NO_ORT_KERNEL:
            weight = numpy_helper.to_array(inits[name]).astype(np.float32)
            dequantized = reference_qdq(weight, enc, axis)
            b.const(f"{name}__qdq", dequantized)
            b.rewire(name, f"{name}__qdq")
            graph.initializer.remove(inits[name])  # the float weight is no longer read
            notes.append(f"{name}: onnxruntime has no {enc.dtype} QuantizeLinear kernel; quantized by onnx.reference "
                         f"(opset {REFERENCE_OPSET}) and run as a float initializer")
            continue
        b.rewire(name, f"{name}__qdq")
        b.qdq(name, f"{name}__qdq", enc, axis, len(dims), dims)
    graph.node.extend(b.new_nodes)
    _topological_sort(graph)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < QDQ_OPSET:
            opset.version = QDQ_OPSET
    onnx.checker.check_model(model)
    return model, notes


def reference_qdq(weight: np.ndarray, enc: Encoding, axis: int | None) -> np.ndarray:
    """``DequantizeLinear(QuantizeLinear(weight))`` for ``enc`` by ``onnx.reference`` (opset 23):
    per tensor, per channel on ``axis``, or blocked (``enc.block_axis``, ``enc.block_size``)."""
    from onnx.reference import ReferenceEvaluator

    dims = list(weight.shape)
    scale = enc.scale.numpy().astype(np.float32)
    attrs = {}
    if enc.per_block:
        bshape = list(enc.block_scale_shape(tuple(dims)))
        full = list(dims)
        full[enc.block_axis] = bshape[enc.block_axis]
        scale = np.ascontiguousarray(np.broadcast_to(scale.reshape(bshape), full))
        attrs = {"axis": enc.block_axis, "block_size": enc.block_size}
    elif axis is not None:
        attrs = {"axis": axis}
    else:
        scale = scale.reshape(())
    ztype = NO_ORT_KERNEL[enc.dtype]
    zero = helper.make_tensor("z", ztype, list(scale.shape), [0.0] * scale.size)
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("w", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
                          [numpy_helper.from_array(scale, "s"), zero])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", REFERENCE_OPSET)])
    return ReferenceEvaluator(m).run(None, {"w": weight})[0].astype(np.float32)


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise EncodingsFileError("applying the encodings made the ONNX graph cyclic")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


class QdqRunner:
    """onnxruntime session on the QDQ model.

    ``runner(*arrays)`` or ``runner(**named_arrays)`` feeds the graph's inputs (each cast to the
    dtype the graph declares) and returns the first output; ``runner.run(...)`` returns all.
    """

    def __init__(self, onnx_path: str | Path, encodings_path: str | Path) -> None:
        import warnings

        import onnxruntime as ort

        model, self.notes = build_qdq_model_with_notes(onnx_path, encodings_path)
        if self.notes:
            warnings.warn(f"QdqRunner: {len(self.notes)} weight(s) without an onnxruntime kernel checked by "
                          f"onnx.reference instead ({self.notes[0].split(':')[0]}, ...)", stacklevel=2)
        options = ort.SessionOptions()
        # Keep QDQ pairs as float ops: fusing them into integer kernels would change the numerics.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feeds(self, *arrays: np.ndarray, **named: np.ndarray) -> dict[str, np.ndarray]:
        values = dict(zip(self.input_names, arrays))
        values.update(named)
        unknown = sorted(set(values) - set(self.input_names))
        if unknown or len(values) != len(self.input_names):
            raise ValueError(f"the ONNX graph takes inputs {self.input_names}; got {sorted(values)}")
        return {i.name: np.ascontiguousarray(values[i.name], dtype=_ONNX_DTYPES.get(i.type, np.float32))
                for i in self.inputs}

    def run(self, *arrays: np.ndarray, **named: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, self.feeds(*arrays, **named))

    def __call__(self, *arrays: np.ndarray, **named: np.ndarray) -> np.ndarray:
        return self.run(*arrays, **named)[0]


_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
