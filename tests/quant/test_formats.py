"""The reference math of every format x granularity (``reference.py``) against numpy oracles written
from the definitions (not from the code): float grids enumerated from (exponent, mantissa, bias)
with ties to the even code, integer grids with ``np.round``; exact .5 ties, saturation, float
subnormals, block boundaries; a partial last block rejected. The fused integer op agrees with the
reference bit for bit on the formats it serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from numerics_reference import division_differs, float_grid, nearest_float, numpy_qdq, values_with_ties
from quant_checks import assert_compiles_like_eager

from orchestrator.quant import QuantizeDequantize
from orchestrator.quant.fake_quant import fake_quantize
from orchestrator.quant.formats import FORMATS, IntFormat
from orchestrator.quant.granularity import (PerBlock, PerChannel, PerToken, blocks_as_rows, full_rank_scale,
                                            reduce_blocks)
from orchestrator.quant.reference import (
    fake_quantize_general,
    quantize_dequantize_backward,
    round_minifloat,
)

SCALED_FLOATS = ["float8_e4m3fn", "float8_e5m2", "float4_e2m1"]


def numpy_float_qdq(x: np.ndarray, scale: float, name: str) -> np.ndarray:
    """``s * nearest(clip(x / s, -M, M))``: ties go to the even code (the even mantissa)."""
    u = (np.float32(x) / np.float32(scale)).astype(np.float64)
    return (nearest_float(u, name) * np.float32(scale)).astype(np.float32)


def float_probe_values(name: str, scale: float) -> np.ndarray:
    """Grid points, exact midpoints (ties), a float32 ulp either side of them, subnormals, beyond max."""
    grid = float_grid(name)
    mids = (grid[1:] + grid[:-1]) / 2
    near = np.concatenate([np.nextafter(mids.astype(np.float32), np.float32(0)),
                           np.nextafter(mids.astype(np.float32), np.float32(np.inf))])
    beyond = grid[-1] * np.array([1.01, 1.5, 4.0, 1e6])
    rng = np.random.default_rng(0)
    rand = rng.standard_normal(2000) * grid[-1] / 3
    u = np.concatenate([grid, mids, near, beyond, rand, grid[1:4] / 3])  # the last: below the smallest subnormal
    u = np.concatenate([u, -u]).astype(np.float32)
    return (u * np.float32(scale)).astype(np.float32)


@pytest.mark.parametrize("name", SCALED_FLOATS)
@pytest.mark.parametrize("scale", [1.0, 0.25, 0.0371])
def test_scaled_float_formats_match_the_numpy_oracle(name, scale):
    x = float_probe_values(name, scale)
    out = fake_quantize_general(torch.from_numpy(x), torch.tensor([scale]), torch.zeros(1), FORMATS[name])
    expected = numpy_float_qdq(x, scale, name)
    bad = np.flatnonzero(out.numpy() != expected)
    assert bad.size == 0, (x[bad[:5]], out.numpy()[bad[:5]], expected[bad[:5]])


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_generic_minifloat_rounding_equals_torchs_float8_casts(name):
    """The rule FP4 uses (torch has no e2m1 conversion) is torch's own rounding where torch has the dtype."""
    f = FORMATS[name]
    u = torch.from_numpy(float_probe_values(name, 1.0)).clamp(-f.max, f.max)
    assert torch.equal(round_minifloat(u, f), u.to(f.torch_dtype).float())


@pytest.mark.parametrize("name,dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_casts_are_torchs_casts(name, dtype):
    q = QuantizeDequantize("t", 16, True, fmt=FORMATS[name])
    x = torch.randn(1000) * 1e3
    assert q.calibrated and torch.equal(q(x), x.to(dtype).float())


def blocked_numpy(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, bitwidth: int, block_axis: int) -> np.ndarray:
    """The integer contract with each block's scale repeated over its elements."""
    b = x.shape[block_axis] // scale.shape[block_axis]
    s = np.repeat(scale, b, axis=block_axis)
    o = np.repeat(offset, b, axis=block_axis)
    return numpy_qdq(x, s, o, bitwidth)


@pytest.mark.parametrize("bitwidth,symmetric", [(4, True), (8, True), (4, False), (3, True)])
@pytest.mark.parametrize("block", [16, 32])
def test_int_per_block_matches_numpy_with_ties_and_saturation(bitwidth, symmetric, block):
    rng = np.random.default_rng(bitwidth + block)
    rows, cols = 6, 64
    scale = (2.0 ** rng.integers(-6, -2, (rows, cols // block))).astype(np.float32)  # powers of two: exact ties
    qmax = (1 << bitwidth) - 1
    offset = np.full_like(scale, -(1 << (bitwidth - 1))) if symmetric else \
        -rng.integers(0, qmax + 1, scale.shape).astype(np.float32)
    s_full = np.repeat(scale, block, axis=1)
    o_full = np.repeat(offset, block, axis=1)
    k = rng.integers(-(qmax + 3), qmax + 3, (rows, cols))
    ties = (k + 0.5) * s_full + o_full * 0  # half steps, including beyond both ends of the grid
    x = np.where(rng.random((rows, cols)) < 0.5, ties, rng.standard_normal((rows, cols)) * s_full * qmax).astype(
        np.float32)
    out = fake_quantize_general(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(offset),
                                IntFormat(bitwidth, symmetric))
    np.testing.assert_array_equal(out.numpy(), blocked_numpy(x, scale, offset, bitwidth, 1))


def test_conv_weight_blocks_run_along_input_channels_sharing_kernel_positions():
    g = PerBlock(axis=0, block_axis=1, block_size=8)
    shape = (4, 16, 3, 3)
    assert g.scale_shape(shape) == (4, 2, 1, 1)
    x = torch.randn(shape)
    lo, hi = reduce_blocks(x, g.scale_shape(shape))
    assert torch.equal(hi[1, 1, 0, 0], x[1, 8:16].max()) and torch.equal(lo[3, 0, 0, 0], x[3, :8].min())
    rows = blocks_as_rows(x, g.scale_shape(shape))
    assert rows.shape == (8, 72) and torch.equal(rows[3].sort().values, x[1, 8:16].reshape(-1).sort().values)
    scale = (torch.rand(4, 2, 1, 1) + 0.5) / 8
    out = fake_quantize_general(x, scale, torch.full_like(scale, -8.0), IntFormat(4, True))
    expected = blocked_numpy(x.numpy(), np.broadcast_to(scale.numpy(), (4, 2, 3, 3)), np.full((4, 2, 3, 3), -8.0,
                             np.float32), 4, 1)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_partial_last_block_is_rejected_and_a_larger_block_is_one_per_row():
    with pytest.raises(ValueError, match="48 is not a multiple of block_size=32"):
        PerBlock(0, 1, 32).scale_shape((4, 48))
    assert PerBlock(0, 1, 128).scale_shape((4, 48)) == (4, 1)
    assert PerBlock(1, 0, 32).scale_shape((64, 8)) == (2, 8)  # HF Conv1D / transposed layouts: blocks on axis 0


@pytest.mark.parametrize("bitwidth,symmetric", [(8, False), (4, True), (8, True)])
def test_reference_equals_the_fused_op_per_channel_forward_and_backward(bitwidth, symmetric):
    """The fused C++ op and the reference agree bit for bit (forward), and on the LSQ gradients."""
    qmax = (1 << bitwidth) - 1
    offset = -(1 << (bitwidth - 1)) if symmetric else -37 % (qmax + 1) * -1
    x = np.concatenate([values_with_ties(0.125, offset, bitwidth), division_differs(0.0371)]).astype(np.float32)
    x = torch.from_numpy(x[: (x.size // 4) * 4]).reshape(4, -1)
    scale = torch.tensor([0.125, 0.0371, 0.5, 0.01])
    off = torch.full((4,), float(offset))
    scale, off = scale[:, None], off[:, None]  # the reference layout: [C, 1]
    fused = fake_quantize(x, scale, off, qmax)
    ref = fake_quantize_general(x, scale, off, IntFormat(bitwidth, symmetric))
    assert torch.equal(fused, ref)
    g = torch.randn_like(x)
    gx, gs, go = torch.ops.qat.quantize_dequantize_backward(g, x, scale, off, qmax, 0.5, True)
    rx, rs, ro = quantize_dequantize_backward(g, x, scale, off, IntFormat(bitwidth, symmetric), 0.5)
    assert torch.equal(gx, rx)
    # the encoding gradients are sums over a channel: another summation order, within the 1e-4 contract
    # (bit for bit where every sum is exact: tests/quant/test_kernels.py)
    torch.testing.assert_close(rs, gs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ro, go, rtol=1e-4, atol=1e-5)


class OpsCalled(TorchDispatchMode):
    """The names of the ops that reach the dispatcher below autograd (a quantizer's ops)."""

    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket).removeprefix("qat."))
        return func(*args, **(kwargs or {}))


BLOCK_LAYOUTS = {  # granularity, weight shape
    "Linear [C, K], blocks along the last dim": (PerBlock(0, 1, 32), (16, 128)),
    "conv [O, I, kh, kw], blocks along the input channels": (PerBlock(0, 1, 8), (4, 16, 3, 3)),
    "HF Conv1D [K, C], blocks along axis 0": (PerBlock(1, 0, 32), (64, 8)),
}


@pytest.mark.parametrize("mode", ["follow", "fixed"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", list(BLOCK_LAYOUTS))
def test_int_blocks_on_any_axis_run_the_fused_op_bit_for_bit(mode, symmetric, layout):
    """Integer blocks with fixed or following encodings run the fused op with their scales in the
    reference layout: output and input gradient equal to the reference op's on the same encoding,
    bit for bit. (Learned blocks stay on the reference's learned op.)"""
    torch.manual_seed(0)
    granularity, shape = BLOCK_LAYOUTS[layout]
    w = (torch.randn(shape) * torch.linspace(0.1, 3.0, shape[-1])).requires_grad_()
    q = QuantizeDequantize("w", 4, symmetric, granularity=granularity, shape=shape, is_param=True,
                           follow=mode == "follow")
    if mode == "fixed":
        lo, hi = reduce_blocks(w.detach(), q.scale_shape)
        q.set_range(lo * 0.8, hi * 0.8)  # some values clipped: the clipped STE matters
    grad = torch.linspace(-1, 1, w.numel()).reshape(shape)
    with OpsCalled() as ops:
        out = q(w)
    assert "quantize_dequantize_with_mask" in ops.names and "quantize_dequantize_general" not in ops.names, ops.names
    out.backward(grad)
    enc = q.encoding(w)
    fmt = IntFormat(4, symmetric)
    scale, offset = enc.scale.reshape(q.scale_shape), enc.offset.reshape(q.scale_shape)
    ref = fake_quantize_general(w.detach(), scale, offset, fmt)
    assert torch.equal(out, ref) and not torch.equal(out, w)
    assert torch.equal(w.grad, quantize_dequantize_backward(grad, w.detach(), scale, offset, fmt, 1.0)[0])
    assert not list(q.parameters())  # nothing else trains


@pytest.mark.parametrize("fmt", [IntFormat(4, True), FORMATS["float8_e4m3fn"], FORMATS["float4_e2m1"]])
def test_backward_per_block_follows_the_formulas(fmt):
    """dL/dx = g inside; dL/ds = sum over the block of g * (c - inside * u); through autograd of the op."""
    x = torch.randn(4, 64) * 3
    scale = (torch.rand(4, 2) + 0.2) / (4 if fmt.is_float else 1)
    scale.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out = fake_quantize_general(xr, scale, torch.full((4, 2), -8.0 if not fmt.is_float else 0.0), fmt, 0.5)
    g = torch.randn_like(x)
    out.backward(g)
    s = scale.detach().repeat_interleave(32, dim=1)
    u = x / s
    if fmt.is_float:
        inside = u.abs() <= fmt.max
        c = out.detach() / s
    else:
        r = torch.round(u)
        inside = (r >= -8) & (r <= 7)
        c = r.clamp(-8, 7)
    torch.testing.assert_close(xr.grad, torch.where(inside, g, 0.0))
    expected = ((g * c - torch.where(inside, g, 0.0) * u) * 0.5).reshape(4, 2, 32).sum(-1)
    torch.testing.assert_close(scale.grad, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_per_token_matches_a_per_row_numpy_oracle():
    q = QuantizeDequantize("a", 8, False, granularity=PerToken())
    x = torch.randn(3, 5, 32) * torch.linspace(0.1, 10, 15).reshape(3, 5, 1)
    out = q(x).numpy()
    xn = x.numpy().reshape(15, 32)
    lo, hi = np.minimum(xn.min(1), 0), np.maximum(xn.max(1), 0)
    s = np.maximum(((hi - lo) / np.float32(255)).astype(np.float32), np.finfo(np.float32).eps)
    o = np.clip(np.round(lo / s), -255, 0)
    expected = numpy_qdq(xn, s[:, None], o[:, None], 8).reshape(3, 5, 32)
    np.testing.assert_array_equal(out, expected)
    assert q.calibrated and not q.needs_calibration


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_per_token_fused_rows_equal_the_reference_op_bit_for_bit(bits, layout):
    """Integer per-token quantizers run the fused op with their ``[..., 1]`` scales; forward and
    input gradient equal the reference op's on the same dynamic encoding, ties included (tokens of
    grid values ``(k + 1/2) * s``: a per-token re-quantization of an already quantized tensor)."""
    q = QuantizeDequantize("a", bits, False, granularity=PerToken())
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 6, 24, generator=g) * torch.linspace(0.01, 30, 12).reshape(2, 6, 1)
    x[0, 0] = (torch.randint(-9, 9, (24,), generator=g) + 0.5) * 0.25  # exact ties at a power-of-two scale
    x[0, 1] = 0.0  # an all-zero token: the scale floor
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with OpsCalled() as ops:
        out = q(xf)
    assert "quantize_dequantize_with_mask" in ops.names and "quantize_dequantize_general" not in ops.names
    scale, offset = q._dynamic_encoding(x)
    ref = fake_quantize_general(xr, scale, offset, IntFormat(bits, False))
    assert torch.equal(out, ref)
    grad = torch.randn(x.shape, generator=g)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(xf.grad, xr.grad)
    assert not torch.equal(out, x)  # it quantized


def test_fp8_per_channel_weight_follows_its_largest_magnitude():
    q = QuantizeDequantize("w", 8, True, channels=4, axis=0, follow=True, fmt=FORMATS["float8_e4m3fn"])
    w = torch.randn(4, 32)
    enc = q.encoding(w)
    torch.testing.assert_close(enc.scale, w.abs().amax(1) / 448.0)
    assert enc.dtype == "float8_e4m3fn"
    torch.testing.assert_close(q(w).abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)  # s * 448: one rounding
    granularity = PerChannel(0)
    assert granularity.scale_shape((4, 32)) == (4,)


@pytest.mark.parametrize("learn_offset", [False, True])
def test_learned_op_is_the_chain_rule_through_exp(learn_offset):
    """``quantize_dequantize_general_learned`` = the op on ``exp(log_scale)``: same forward, and
    ``d/dlog_scale = s * dL/ds``; the offset's gradient passes its rounding straight through."""
    x = torch.randn(4, 64) * 2
    log_s = (torch.randn(4, 2) * 0.1 - 1.5).requires_grad_(True)
    off = torch.full((4, 2), -3.0 if learn_offset else -8.0).requires_grad_(learn_offset)
    fmt = IntFormat(4, not learn_offset)
    out = torch.ops.qat.quantize_dequantize_general_learned(x, log_s, torch.full((4, 2), -20.0), off, "int", 15, 0.5,
                                                             learn_offset)
    log_s2 = log_s.detach().clone().requires_grad_(True)
    off2 = off.detach().clone().requires_grad_(learn_offset)
    ref = fake_quantize_general(x, log_s2.exp(), off2, fmt, 0.5)
    assert torch.equal(out, ref)
    g = torch.randn_like(x)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(log_s.grad, log_s2.grad)
    if learn_offset:
        torch.testing.assert_close(off.grad, off2.grad)


COMPILE_CASES = {  # quantizer kwargs, input shape
    "int8 per tensor, fixed": (dict(bitwidth=8, symmetric=False), (4, 8, 6, 6)),
    "int8 per channel axis 1, fixed": (dict(bitwidth=8, symmetric=False, channels=8, axis=1), (4, 8, 6, 6)),
    "int4 blocks of a conv weight's input channels, follow": (
        dict(bitwidth=4, symmetric=True, granularity=PerBlock(0, 1, 8), shape=(4, 16, 3, 3), follow=True,
             is_param=True), (4, 16, 3, 3)),
    "int4 blocks along axis 0 (HF Conv1D), fixed": (
        dict(bitwidth=4, symmetric=True, granularity=PerBlock(1, 0, 32), shape=(64, 8), is_param=True), (64, 8)),
    "int8 per token": (dict(bitwidth=8, symmetric=False, granularity=PerToken()), (2, 5, 32)),
    "fp8 per channel, fixed": (dict(bitwidth=8, symmetric=True, channels=8, axis=1, fmt=FORMATS["float8_e4m3fn"]),
                               (4, 8, 6, 6)),
}


@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_every_granularity_compiles_to_one_op_and_new_encodings_never_recompile(name):
    """``torch.compile``: one quantize op, no graph break, eager's forward and input gradient bit for
    bit; setting other encodings (fixed quantizers) runs the same graph."""
    kwargs, shape = COMPILE_CASES[name]
    q = QuantizeDequantize("q", **kwargs)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if q.needs_calibration and not q.follow:  # the min-max range of each scale element's block
        full = q.scale_shape if isinstance(q.granularity, PerBlock) else \
            full_rank_scale(torch.zeros(q.scale_shape), x.dim(), q.axis).shape
        q.set_range(*reduce_blocks(x, tuple(full)))
    assert_compiles_like_eager(q, x, quantize_ops=1)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(q, backend=counting_backend, fullgraph=True)
    for step in range(3):
        out = compiled(x)
        assert torch.equal(out, q(x))
        if q.needs_calibration and not q.follow:
            q.set_encoding(q.scale * 1.1, q.offset)
    assert len(compiles) == 1
    torch._dynamo.reset()
