"""The numerics contract against onnxruntime itself: ``QuantizeDequantize`` alone vs an ONNX graph
``QuantizeLinear -> DequantizeLinear`` built here by hand (not by ``qdq.py``), per tensor and per
channel on axis 0 and 1, bit widths 2-16, exact .5 ties and values where ``x * (1/s)`` would round
differently from ``x / s``. Bit widths without an ONNX integer type are clipped to the b-bit grid's
``[min, max]`` first and stored in the 8/16-bit type; 4 bits also run natively (INT4/UINT4)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from numerics_reference import division_differs, fixed, values_with_ties
from onnx import TensorProto, helper, numpy_helper

from orchestrator.quant import QuantizeDequantize
from orchestrator.quant.encoding import qmax_of

CONTAINERS = {  # (symmetric, wide) -> ONNX type, numpy type
    (True, False): (TensorProto.INT8, np.int8), (True, True): (TensorProto.INT16, np.int16),
    (False, False): (TensorProto.UINT8, np.uint8), (False, True): (TensorProto.UINT16, np.uint16),
}


def onnxruntime_qdq(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, bitwidth: int, symmetric: bool,
                    axis: int | None = None, native4: bool = False) -> np.ndarray:
    """onnxruntime's ``DQ(Q(x))`` for the encoding ``(scale, offset)`` (AIMET offsets, zero point -o)."""
    per_channel = axis is not None
    scale = np.asarray(scale, np.float32).reshape(-1 if per_channel else ())
    offset = np.asarray(offset, np.float64).reshape(-1 if per_channel else ())
    if native4:
        onnx_type, np_type = (TensorProto.INT4, np.int8) if symmetric else (TensorProto.UINT4, np.uint8)
    else:
        onnx_type, np_type = CONTAINERS[(symmetric, bitwidth > 8)]
    zero = (np.zeros_like(offset) if symmetric else -offset).astype(np_type)
    zp = helper.make_tensor("zp", onnx_type, list(zero.shape), zero.reshape(-1).tolist())
    inits = [numpy_helper.from_array(scale, "s"), zp]
    nodes, src = [], "x"
    if bitwidth not in (8, 16) and not native4:
        shape = [1] * x.ndim
        if per_channel:
            shape[axis] = -1
        lo = (scale.astype(np.float32) * offset.astype(np.float32)).reshape(shape if per_channel else ())
        hi = (scale.astype(np.float32) * (offset + qmax_of(bitwidth)).astype(np.float32)).reshape(
            shape if per_channel else ())
        inits += [numpy_helper.from_array(np.float32(lo), "lo"), numpy_helper.from_array(np.float32(hi), "hi")]
        nodes += [helper.make_node("Max", ["x", "lo"], ["xl"]), helper.make_node("Min", ["xl", "hi"], ["xc"])]
        src = "xc"
    attrs = {"axis": axis} if per_channel else {}
    nodes += [helper.make_node("QuantizeLinear", [src, "s", "zp"], ["q"], **attrs),
              helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bitwidth", range(2, 17))
def test_per_tensor_equals_onnxruntime_with_ties(bitwidth, symmetric):
    qmax = qmax_of(bitwidth)
    scale = 2.0**-5
    offset = -(1 << (bitwidth - 1)) if symmetric else -(qmax // 3)
    x = values_with_ties(scale, offset, bitwidth)
    ours = fixed(bitwidth, scale, offset, symmetric=symmetric)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, onnxruntime_qdq(x, scale, offset, bitwidth, symmetric))


@pytest.mark.parametrize("scale", [0.0123, 0.1, 0.7071])
def test_division_semantics_equal_onnxruntime(scale):
    x = division_differs(scale)
    x = x[np.abs(x / np.float32(scale)) < 120]
    ours = fixed(8, scale, -128)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, onnxruntime_qdq(x, scale, -128, 8, symmetric=False))


def weight_with_ties(shape: tuple[int, ...], axis: int, bitwidth: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight whose per-channel symmetric min-max scale is 2^-e_c (exact), half of it exact .5 ties."""
    rng = np.random.default_rng(seed)
    half = 1 << (bitwidth - 1)
    w = np.moveaxis(np.zeros(shape, np.float32), axis, 0)
    scales = np.float32(2.0) ** -np.float32(3 + np.arange(w.shape[0]) % 4)
    for c, s in enumerate(scales):
        flat = w[c].reshape(-1)
        n = flat.size
        k = rng.integers(-half, half - 1, n)  # k + 0.5 stays within [-half, half - 1]
        ties = (k + np.float32(0.5)) * s
        rand = rng.uniform(-half * s, (half - 1) * s, n).astype(np.float32)
        flat[:] = np.where(np.arange(n) % 2 == 0, ties, rand)
        flat[0] = (half - 1) * s  # pins the channel's scale: max / (half - 1) = s
        w[c] = flat.reshape(w[c].shape)
    return np.moveaxis(w, 0, axis).copy(), scales


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bitwidth", [2, 3, 4, 5, 8, 12, 16])
def test_per_channel_equals_onnxruntime_with_ties(axis, bitwidth):
    w, scales = weight_with_ties((6, 5, 3, 3), axis, bitwidth, seed=10 * axis + bitwidth)
    q = QuantizeDequantize("w", bitwidth, symmetric=True, channels=w.shape[axis], axis=axis, follow=True,
                           is_param=True)
    enc = q.encoding(torch.from_numpy(w))
    np.testing.assert_array_equal(enc.scale.numpy(), scales)  # so the ties are exact ties
    ours = q(torch.from_numpy(w)).numpy()
    theirs = onnxruntime_qdq(w, enc.scale.numpy(), enc.offset.numpy(), bitwidth, True, axis=axis)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("symmetric", [False, True])
def test_four_bits_equal_onnxruntime_native_int4(symmetric):
    scale, offset = 2.0**-4, (-8 if symmetric else -5)
    x = values_with_ties(scale, offset, 4)
    ours = fixed(4, scale, offset, symmetric=symmetric)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, onnxruntime_qdq(x, scale, offset, 4, symmetric, native4=True))
