"""The fused float op (``qat::quantize_dequantize_float``, C++): the reference's scaled float formats
(FP8 e4m3fn/e5m2, FP4 e2m1) with a fixed scale, bit for bit, at every scale layout; the 1-byte mask
as the backward's only saved tensor; what the quantizers call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics_reference import float_grid, nearest_float
from quant_checks import assert_compiles_like_eager
from test_formats import OpsCalled
from test_kernels import CASES

from orchestrator.quant import QuantizeDequantize, kernels, reference
from orchestrator.quant.fake_quant import fake_quantize_format
from orchestrator.quant.formats import FORMATS
from orchestrator.quant.granularity import MX, NVFP4, PerTokenBlocks
from orchestrator.quant.kernels import aten

pytestmark = pytest.mark.skipif(kernels.backend() != "cpp", reason="the fused float op is the C++ kernel's")

SCALED = ["float8_e4m3fn", "float8_e5m2", "float4_e2m1"]
ZERO = torch.zeros(1)


def op_args(name: str) -> tuple[int, int, float]:
    fmt = FORMATS[name]
    return fmt.mantissa_bits, fmt.min_normal_exponent, fmt.max


def case(shape, scale_shape, seed=0):
    """``x`` spread over the format's whole range at each scale, with zeros, and positive scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-14, 20, shape, generator=g).float())
    x.view(-1)[::17] = 0.0
    x.view(-1)[1] = -1e9  # beyond every format's range at every scale: clipped
    scale = torch.rand(scale_shape, generator=g) * 2 + 2.0 ** -10
    return x, scale


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("layout", list(CASES))
def test_forward_and_mask_equal_the_reference_at_every_layout(name, layout):
    shape, scale_shape = CASES[layout]
    x, scale = case(shape, scale_shape)
    ref, ref_inside = reference.quantize_dequantize_with_mask(x, scale, ZERO, FORMATS[name])
    y = torch.ops.qat.quantize_dequantize_float(x, scale, *op_args(name))
    y2, inside = torch.ops.qat.quantize_dequantize_float_with_mask(x, scale, *op_args(name))
    assert torch.equal(y, ref) and torch.equal(y2, ref) and torch.equal(inside, ref_inside)
    assert not torch.equal(y, x) and not inside.all() and inside.any()  # it rounded, and it clipped some


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -130, 3.0e30])
def test_sampled_float32_bit_patterns_equal_the_reference(name, scale):
    """2^20 float32 bit patterns (normals, float32 subnormals, huge values) under a normal, a subnormal
    and a huge scale: equal to the reference (torch's float8 casts; the minifloat rule for FP4)."""
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1 << 20,), generator=torch.Generator().manual_seed(1),
                         dtype=torch.int32)
    u = bits.view(torch.float32)
    u = u[torch.isfinite(u)]
    s = torch.tensor(scale)
    y = torch.ops.qat.quantize_dequantize_float(u, s, *op_args(name))
    assert torch.equal(y, reference.quantize_dequantize(u, s, ZERO, FORMATS[name]))


@pytest.mark.parametrize("name", SCALED)
def test_ties_subnormals_and_saturation_follow_the_numpy_oracle(name):
    """Every grid value, every midpoint between neighbours (ties to the even code), values beyond the
    largest (saturated), at a power-of-two scale: the op equals ``s * nearest_float(x / s)``."""
    grid = float_grid(name)
    mids = (grid[1:] + grid[:-1]) / 2
    u = np.concatenate([grid, mids, [grid[-1] * 1.03, grid[-1] * 40, grid[1] / 4]])
    u = np.concatenate([u, -u]).astype(np.float32)
    s = 0.125
    x = torch.from_numpy(u * np.float32(s))
    y = torch.ops.qat.quantize_dequantize_float(x, torch.tensor(s), *op_args(name))
    np.testing.assert_array_equal(y.numpy(), (nearest_float(u, name) * s).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_computed_in_float32_as_the_reference(dtype):
    x, scale = case((16, 128), (16, 4))
    x = x.clamp(-6e4, 6e4).to(dtype)
    y = torch.ops.qat.quantize_dequantize_float(x, scale, *op_args("float8_e4m3fn"))
    assert y.dtype == dtype
    assert torch.equal(y, reference.quantize_dequantize(x, scale, ZERO, FORMATS["float8_e4m3fn"]))


@pytest.mark.parametrize("layout", ["per channel axis 1", "blocks along the last dim", "blocks on two axes"])
def test_the_input_gradient_is_the_clipped_ste_from_a_saved_one_byte_mask(layout):
    """Autograd saves only the bool mask (not ``x``), and the input gradient equals the reference op's."""
    shape, scale_shape = CASES[layout]
    x, scale = case(shape, scale_shape)
    fmt = FORMATS["float4_e2m1"]
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fake_quantize_format(xf, scale, ZERO, fmt)
    assert [t.dtype for t in saved] == [torch.bool] and saved[0].shape == x.shape
    ref = reference.fake_quantize_general(xr, scale, ZERO, fmt)
    assert torch.equal(y, ref)
    g = torch.randn(shape)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(xf.grad, xr.grad) and not torch.equal(xf.grad, g)


def test_the_aten_kernels_of_other_devices_equal_the_cpp_kernel():
    x, scale = case((8, 64, 3, 3), (8, 2, 1, 1))
    for name in SCALED:
        y, inside = aten.float_forward_with_mask(x, scale, *op_args(name))
        y_cpp, inside_cpp = torch.ops.qat.quantize_dequantize_float_with_mask(x, scale, *op_args(name))
        assert torch.equal(y, y_cpp) and torch.equal(inside, inside_cpp)


def test_a_learned_scale_or_an_unknown_format_is_one_clear_error():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="scale requires grad.*allowed: a fixed scale"):
        torch.ops.qat.quantize_dequantize_float(x, torch.ones(()).requires_grad_(), *op_args("float8_e4m3fn"))
    with pytest.raises(RuntimeError, match=r"mantissa_bits=30.*allowed: 0 <= mantissa_bits <= 22"):
        torch.ops.qat.quantize_dequantize_float(x, torch.ones(()), 30, -6, 448.0)
    with pytest.raises(RuntimeError, match=r"\(3, -6, 500\) is no scaled float format; allowed: float8_e4m3fn"):
        aten.float_forward(x, torch.ones(()), 3, -6, 500.0)
    with pytest.raises(RuntimeError, match=r"scale of shape \[3, 1\] does not fit x of shape \[4, 8\]"):
        torch.ops.qat.quantize_dequantize_float(x, torch.ones(3, 1), *op_args("float8_e4m3fn"))


QUANTIZERS = {  # quantizer kwargs, input shape
    "fp8 weights per channel, follow": (dict(bitwidth=8, symmetric=True, channels=16, axis=0, is_param=True,
                                             follow=True, fmt=FORMATS["float8_e4m3fn"]), (16, 64)),
    "mxfp4 weights, follow": (dict(bitwidth=4, symmetric=True, granularity=MX(0, 1, 32), shape=(16, 64),
                                   is_param=True, follow=True, fmt=FORMATS["float4_e2m1"]), (16, 64)),
    "nvfp4 activations per token blocks, dynamic": (dict(bitwidth=4, symmetric=True,
                                                         granularity=PerTokenBlocks(NVFP4, 16),
                                                         fmt=FORMATS["float4_e2m1"]), (2, 5, 64)),
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_float_quantizers_run_the_fused_op_and_compile_to_one_op(name):
    kwargs, shape = QUANTIZERS[name]
    q = QuantizeDequantize("q", **kwargs)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with OpsCalled() as ops:
        q(x).sum().backward()
    assert "quantize_dequantize_float_with_mask" in ops.names and "quantize_dequantize_general" not in ops.names
    assert_compiles_like_eager(q, x.detach(), quantize_ops=1)


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("layout", ["per tensor 4-D", "per channel axis 1", "per channel last axis",
                                    "blocks along the last dim", "blocks on two axes"])
def test_range_learning_equals_the_reference_learned_op(name, layout):
    """Forward and input gradient bit for bit; the log-scale gradient (LSQ, times s) to float32 rounding
    (the kernel sums ``g * (c - u)`` inside and ``g * c`` outside in double, the reference in float32)."""
    shape, scale_shape = CASES[layout]
    x, _ = case(shape, scale_shape)
    g = torch.Generator().manual_seed(3)
    log_scale = (torch.randn(scale_shape, generator=g) * 0.5 + 2.0).requires_grad_()
    log_ref = log_scale.detach().clone().requires_grad_()
    log_floor = torch.full(scale_shape, -20.0)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = torch.ops.qat.quantize_dequantize_float_learned(xf, log_scale, log_floor, *op_args(name), 0.5)
    ref = torch.ops.qat.quantize_dequantize_general_learned(xr, log_ref, log_floor, torch.zeros(scale_shape), name,
                                                            0, 0.5, False)
    grad = torch.randn(shape, generator=g)
    y.backward(grad)
    ref.backward(grad)
    assert torch.equal(y, ref) and torch.equal(xf.grad, xr.grad)
    torch.testing.assert_close(log_scale.grad, log_ref.grad, rtol=1e-4, atol=1e-4 * log_ref.grad.abs().max().item())
    assert log_ref.grad.abs().max() > 0
    gx, g_log = aten.float_learned_backward(grad, x, log_scale.detach(), log_floor, *op_args(name), 0.5)
    assert torch.equal(gx, xr.grad) and torch.equal(g_log, log_ref.grad)  # other devices: the reference itself


def test_a_learned_fp8_quantizer_runs_the_fused_op_and_compiles_like_eager():
    """Range learning on FP8 activations: one fused op; under torch.compile the scale's exp stays inside
    it, so the output and both gradients equal eager's bit for bit."""
    q = QuantizeDequantize("a", 8, True, learnable=True, fmt=FORMATS["float8_e4m3fn"])
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0)) * 3
    q.set_range(x.min(), x.max() * 0.5)
    with OpsCalled() as ops:
        q(x.clone().requires_grad_()).sum().backward()
    assert "quantize_dequantize_float_learned" in ops.names and "quantize_dequantize_general_learned" not in ops.names
    assert_compiles_like_eager(q, x, quantize_ops=1)
    grads = []
    for module in (q, torch.compile(q, fullgraph=True)):
        q.zero_grad()
        module(x).pow(2).sum().backward()
        grads.append(q.log_scale.grad.clone())
    torch._dynamo.reset()
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
