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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .encoding import AXIS_UNKNOWN, Encoding
from .encodings_io import read_encodings
from .errors import EncodingsFileError, QuantFileError

QDQ_OPSET = 21


def _container(enc: Encoding) -> tuple[int, np.dtype, np.ndarray]:
    """ONNX type, numpy type and zero point ``[C]`` holding ``enc``'s integers."""
    wide = enc.bitwidth > 8
    if enc.symmetric:
        dtype = np.int16 if wide else np.int8
        zero = np.zeros(enc.scale.numel(), dtype=dtype)
        return (TensorProto.INT16 if wide else TensorProto.INT8), dtype, zero
    dtype = np.uint16 if wide else np.uint8
    zero = (-enc.offset.numpy()).astype(dtype)
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

    def qdq(self, source: str, target: str, enc: Encoding, axis: int | None, rank: int) -> None:
        """Nodes computing ``target = DQ(Q(clip(source)))``, per channel on ``axis`` when it is not None."""
        tag = f"qdq{self.n}"
        self.n += 1
        _, _, zero = _container(enc)
        per_channel = axis is not None
        scale = enc.scale.numpy().astype(np.float32)
        if not per_channel:
            scale, zero = scale.reshape(()), zero.reshape(())
        x = source
        if enc.bitwidth not in (8, 16):
            shape = tuple(-1 if d == axis else 1 for d in range(rank)) if per_channel else ()
            lo = (enc.min.numpy().astype(np.float32)).reshape(shape)
            hi = (enc.max.numpy().astype(np.float32)).reshape(shape)
            lo_name, hi_name = self.const(f"{tag}_min", lo), self.const(f"{tag}_max", hi)
            self.new_nodes.append(helper.make_node("Max", [x, lo_name], [f"{tag}_lo"], name=f"{tag}_Max"))
            self.new_nodes.append(helper.make_node("Min", [f"{tag}_lo", hi_name], [f"{tag}_clip"], name=f"{tag}_Min"))
            x = f"{tag}_clip"
        s_name, z_name = self.const(f"{tag}_scale", scale), self.const(f"{tag}_zero_point", zero)
        attrs = {"axis": axis} if per_channel else {}
        self.new_nodes.append(helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{tag}_q"],
                                               name=f"{tag}_Q", **attrs))
        self.new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", s_name, z_name], [target],
                                               name=f"{tag}_DQ", **attrs))

    def rewire(self, old: str, new: str) -> None:
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


# (op type, input index) -> channel axis of a per-channel weight fed there (-1: the last axis).
CONSUMER_AXIS = {("Conv", 1): 0, ("ConvTranspose", 1): 1, ("Gather", 0): 0, ("MatMul", 1): -1, ("LSTM", 1): 1,
                 ("LSTM", 2): 1, ("GRU", 1): 1, ("GRU", 2): 1, ("RNN", 1): 1, ("RNN", 2): 1}


def _param_axis(graph: onnx.GraphProto, name: str, enc: Encoding, dims: list[int], path) -> int:
    """The channel axis of a per-channel param encoding: as recorded, else from the ops that consume it."""
    channels = enc.scale.numel()
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
        matching = [d for d, size in enumerate(dims) if size == channels]
        axis = axes.pop() if len(axes) == 1 else (matching[0] if len(matching) == 1 else None)
        if axis is None:
            raise EncodingsFileError(f"{path}: {name}: per-channel encoding without an axis, and the ops consuming "
                                     "it do not tell which axis holds its channels")
    if not 0 <= axis < len(dims) or dims[axis] != channels:
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
    model = _load_model(onnx_path)
    acts, params = read_encodings(encodings_path)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {i.name for i in graph.input}
    inits = {i.name: i for i in graph.initializer}
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
        b.rewire(name, f"{name}__qdq")
        b.qdq(name, f"{name}__qdq", enc, axis, len(dims))
    graph.node.extend(b.new_nodes)
    _topological_sort(graph)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < QDQ_OPSET:
            opset.version = QDQ_OPSET
    onnx.checker.check_model(model)
    return model


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
        import onnxruntime as ort

        model = build_qdq_model(onnx_path, encodings_path)
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
