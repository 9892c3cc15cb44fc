"""An independent check of an export: apply the encodings to the float ONNX graph and run it.

``build_qdq_model(onnx_path, encodings_path)`` inserts ``QuantizeLinear -> DequantizeLinear``
on every tensor the encodings file names (activations: graph tensors; params: initializers,
per output channel on axis 0). It reads only the two exported files, never the simulation,
so agreement between onnxruntime on this model and ``sim.model`` shows the export is right.

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

from .encoding import Encoding
from .encodings_io import read_encodings
from .errors import EncodingsFileError

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
        """Nodes computing ``target = DQ(Q(clip(source)))``."""
        tag = f"qdq{self.n}"
        self.n += 1
        _, _, zero = _container(enc)
        per_channel = axis is not None and enc.per_channel
        scale = enc.scale.numpy().astype(np.float32)
        if not per_channel:
            scale, zero = scale.reshape(()), zero.reshape(())
        x = source
        if enc.bitwidth not in (8, 16):
            shape = (-1,) + (1,) * (rank - 1) if per_channel else ()
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


def build_qdq_model(onnx_path: str | Path, encodings_path: str | Path) -> onnx.ModelProto:
    """The ONNX model of ``onnx_path`` with the encodings of ``encodings_path`` applied as QDQ."""
    model = onnx.load(str(onnx_path))
    acts, params = read_encodings(encodings_path)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {i.name for i in graph.input}
    inits = {i.name: i for i in graph.initializer}
    missing = [n for n in acts if n not in producers and n not in inputs] + [n for n in params if n not in inits]
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
        rank = len(inits[name].dims)
        b.rewire(name, f"{name}__qdq")
        b.qdq(name, f"{name}__qdq", enc, 0, rank)
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
    """onnxruntime session on the QDQ model; ``runner(*arrays)`` returns the first output."""

    def __init__(self, onnx_path: str | Path, encodings_path: str | Path) -> None:
        import onnxruntime as ort

        model = build_qdq_model(onnx_path, encodings_path)
        options = ort.SessionOptions()
        # Keep QDQ pairs as float ops: fusing them into integer kernels would change the numerics.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        feeds = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(self.input_names, arrays)}
        return self.session.run(None, feeds)[0]
