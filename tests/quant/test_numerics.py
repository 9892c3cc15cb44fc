"""Quantizer numerics against a numpy reference of the contract (ONNX QuantizeLinear semantics):
``r = round(x / s)`` with true float32 division and half-to-even ties, ``x_hat = s * clamp(r, o,
o + 2^b - 1)``; the encoding formulas; clipped STE; LSQ/LSQ+ gradients and their scaling factor;
the log-parametrised learned scale and its floor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numerics_reference import division_differs, fixed, numpy_qdq, values_with_ties

from orchestrator.quant import QuantizeDequantize
from orchestrator.quant.encoding import SCALE_CEIL, SCALE_FLOOR, asymmetric_from_range, qmax_of, symmetric_from_range
from orchestrator.quant.fake_quant import clamp_straight_through, round_clamp_straight_through
from orchestrator.quant.quantizer import FLOOR_RATIO


@pytest.mark.parametrize("bitwidth", range(2, 17))
def test_per_tensor_matches_numpy_with_ties(bitwidth):
    scale, offset = 2.0**-5, -(qmax_of(bitwidth) // 3)
    x = values_with_ties(scale, offset, bitwidth)
    ties = x[3000:-3] / np.float32(scale)
    assert np.all(ties - np.floor(ties) == 0.5)  # the ties really are exact
    ours = fixed(bitwidth, scale, offset)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, numpy_qdq(x, scale, offset, bitwidth))


@pytest.mark.parametrize("scale", [0.0123, 0.1, 3e-3, 0.7071])
def test_true_division_not_reciprocal_multiplication(scale):
    """Where ``x * (1/s)`` rounds differently from ``x / s``, the quantizer follows the division."""
    x = division_differs(scale)
    x = x[np.abs(x / np.float32(scale)) < 120]
    q = fixed(8, scale, -128)
    ours = q(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, numpy_qdq(x, scale, -128, 8))
    by_reciprocal = np.float32(scale) * np.round(x * (np.float32(1) / np.float32(scale)))
    assert np.all(ours != by_reciprocal)  # the test can tell the two apart


def test_ties_round_half_to_even():
    q = fixed(8, 1.0, -128)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5])
    assert q(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, -128.0]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bitwidth", [2, 4, 8, 16])
def test_per_channel_matches_numpy(axis, bitwidth):
    rng = np.random.default_rng(axis * 100 + bitwidth)
    w = (rng.standard_normal((6, 5, 3, 3)) * np.linspace(0.1, 2.0, 6).reshape(6, 1, 1, 1)).astype(np.float32)
    channels = w.shape[axis]
    scale = np.float32(rng.uniform(0.01, 0.2, channels))
    offset = np.full(channels, -float(1 << (bitwidth - 1)), np.float32)
    shape = [1] * 4
    shape[axis] = -1
    w.reshape(-1)[:3] = np.float32([0.5, 1.5, -2.5]) * scale.reshape(shape).reshape(-1)[0]  # near-ties
    q = fixed(bitwidth, scale, offset, symmetric=True, axis=axis)
    ours = q(torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(ours, numpy_qdq(w, scale.reshape(shape), offset.reshape(shape), bitwidth))


@pytest.mark.parametrize("axis", [0, 1])
def test_follow_mode_recomputes_the_encoding_from_the_tensor(axis):
    """Weights: the encoding is the symmetric min-max one of the tensor passed in, per channel."""
    rng = np.random.default_rng(axis)
    w = rng.standard_normal((4, 6, 3)).astype(np.float32)
    q = QuantizeDequantize("w", 4, symmetric=True, channels=w.shape[axis], axis=axis, follow=True, is_param=True)
    dims = tuple(d for d in range(3) if d != axis)
    scale = np.maximum(w.max(axis=dims) / np.float32(7), -w.min(axis=dims) / np.float32(8)).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    expected = numpy_qdq(w, scale.reshape(shape), np.float32(-8), 4)
    np.testing.assert_array_equal(q(torch.from_numpy(w)).numpy(), expected)
    enc = q.encoding(torch.from_numpy(w))
    np.testing.assert_allclose(enc.scale.numpy(), scale, rtol=1e-7)
    assert enc.axis == axis and enc.offset.tolist() == [-8.0] * w.shape[axis]
    w2 = w * 3
    np.testing.assert_allclose(q.encoding(torch.from_numpy(w2)).scale.numpy(), scale * 3, rtol=1e-6)


@pytest.mark.parametrize("bitwidth", [2, 4, 8, 16])
def test_symmetric_scale_formula(bitwidth):
    w = torch.tensor([[-0.9, 0.3], [0.2, 1.4], [-2.0, -1.0]])
    scale, offset = symmetric_from_range(w.amin(1), w.amax(1), bitwidth)
    half = 2 ** (bitwidth - 1)
    expected = torch.maximum(w.amax(1) / (half - 1), -w.amin(1) / half)
    assert torch.allclose(scale, expected)
    assert torch.all(offset == -half)


@pytest.mark.parametrize("rmin,rmax", [(-1.3, 2.7), (0.5, 3.0), (-4.0, -1.0), (0.0, 0.0)])
def test_asymmetric_encoding_contains_zero_exactly(rmin, rmax):
    for bw in (2, 4, 8, 16):
        s, o = asymmetric_from_range(torch.tensor([rmin]), torch.tensor([rmax]), bw)
        assert float(s) > 0 and float(o) == round(float(o)) and -qmax_of(bw) <= float(o) <= 0
        expected_s = max((max(rmax, 0.0) - min(rmin, 0.0)) / qmax_of(bw), SCALE_FLOOR)
        assert float(s) == pytest.approx(expected_s, rel=1e-6)
        q = QuantizeDequantize("t", bw, symmetric=False)
        q.set_encoding(s, o)
        assert float(q(torch.zeros(1))) == 0.0
        enc = q.encoding()
        assert float(enc.min) <= min(rmin, 0.0) + float(s) and float(enc.max) >= max(rmax, 0.0) - float(s)


def test_clipped_ste_gradient():
    q = fixed(4, 0.25, -4)  # grid [-1.0, 2.75]
    x = torch.tensor([-2.0, -1.2, -1.0, 0.3, 2.75, 2.8, 2.9, 4.0], requires_grad=True)
    q(x).sum().backward()
    # inside the grid (and within half a step of an end point, which rounds onto it): 1; clipped: 0
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def learned(bitwidth: int, scale: float, offset: float, symmetric: bool = False, grad_scaling: bool = False,
            channels: int = 1, axis: int | None = None) -> QuantizeDequantize:
    q = QuantizeDequantize("t", bitwidth, symmetric=symmetric, channels=channels, axis=axis, learnable=True,
                           grad_scaling=grad_scaling, is_param=symmetric)
    q.set_encoding(torch.full((channels,), scale), torch.full((channels,), offset))
    return q


def test_lsq_gradients_match_the_formulas():
    """d/ds: r - x/s inside, the clip bound outside; d/do: s outside, 0 inside. The parameter is
    log_scale, so its gradient is s * dL/ds."""
    bw, s, o = 4, 0.25, -4.0
    q = learned(bw, s, o)
    x = torch.tensor([[-2.0, -0.8, 0.3, 1.1, 2.6, 5.0]], requires_grad=True)
    q(x).sum().backward()
    u = x.detach() / s
    lo, hi = o, o + qmax_of(bw)
    r = torch.round(u)
    inside = (r >= lo) & (r <= hi)
    d_s = torch.where(inside, r - u, torch.where(r < lo, torch.tensor(lo), torch.tensor(hi))).sum()
    d_o = torch.where(inside, 0.0, s).sum()
    assert torch.allclose(q.log_scale.grad, (s * d_s).reshape(1), atol=1e-6), (q.log_scale.grad, s * d_s)
    assert torch.allclose(q.offset.grad, d_o.reshape(1))
    assert torch.equal(x.grad, inside.float())


def test_lsq_gradient_scaling_factor():
    """With grad scaling the encoding gradients are divided by sqrt(N * (2^b - 1)), N the elements
    per sample (activations) or per channel (weights)."""
    x = torch.randn(8, 3, 4, 4)
    grads = []
    for scaling in (False, True):
        q = learned(8, 0.01, -128, grad_scaling=scaling)
        q(x).sum().backward()
        grads.append(q.log_scale.grad.clone())
    assert torch.allclose(grads[1], grads[0] / math.sqrt(3 * 4 * 4 * 255), rtol=1e-4)
    w = torch.randn(5, 3, 3, 3)
    wgrads = []
    for scaling in (False, True):
        q = learned(4, 0.1, -8, symmetric=True, grad_scaling=scaling, channels=5, axis=0)
        q(w).sum().backward()
        wgrads.append(q.log_scale.grad.clone())
    assert torch.allclose(wgrads[1], wgrads[0] / math.sqrt(27 * 15), rtol=1e-4)


@pytest.mark.parametrize("bitwidth", [2, 4, 8, 16])
def test_learned_quantizer_matches_aten_learnable_op_away_from_ties(bitwidth):
    """Power-of-two scale (x/s exact either way), random values (no exact ties): forward equal,
    gradients equal to torch's LSQ kernel (ours w.r.t. log_scale: s times torch's w.r.t. s)."""
    qmax = qmax_of(bitwidth)
    scale, offset = 2.0**-4, -(qmax // 3)
    q = learned(bitwidth, scale, offset)
    x = torch.from_numpy(values_with_ties(scale, offset, bitwidth)[:3000])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    s_ref = torch.tensor([scale], requires_grad=True)
    zp_ref = torch.tensor([float(-offset)], requires_grad=True)
    ours = q(xa)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xb, s_ref, zp_ref, 0, qmax, 1.0)
    assert torch.equal(ours, ref)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ours.backward(g)
    ref.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.allclose(q.log_scale.grad, scale * s_ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(q.offset.grad, -zp_ref.grad, rtol=1e-5, atol=1e-5)


def test_learned_per_channel_weight_matches_aten():
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([2.0**-3, 2.0**-4, 2.0**-2, 2.0**-3, 2.0**-5])
    q = QuantizeDequantize("w", 4, symmetric=True, channels=5, axis=0, learnable=True, grad_scaling=False,
                           is_param=True)
    q.set_encoding(scale)
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    s_ref = scale.clone().requires_grad_()
    ours = q(wa)
    ref = torch._fake_quantize_learnable_per_channel_affine(wb, s_ref, torch.full((5,), 8.0), 0, 0, 15, 1.0)
    assert torch.equal(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.equal(wa.grad, wb.grad)
    assert torch.allclose(q.log_scale.grad, scale * s_ref.grad, rtol=1e-4, atol=1e-5)


def test_learned_scale_is_floored_relative_to_its_calibration_with_straight_through():
    q = learned(8, 0.02, -100)
    with torch.no_grad():
        q.log_scale.fill_(-1e5)  # what no optimizer step should do; the floor holds it
    enc = q.encoding()
    assert float(enc.scale) == pytest.approx(0.02 * FLOOR_RATIO, rel=1e-5)
    assert bool(q.floor_hit())
    x = torch.randn(100)
    assert torch.isfinite(q(x)).all()
    with torch.no_grad():
        q.log_scale.fill_(1e5)
    assert float(q.encoding().scale) <= SCALE_CEIL * (1 + 1e-6) and not bool(q.floor_hit())
    q.log_scale.grad = None
    with torch.no_grad():
        q.log_scale.fill_(math.log(0.02 * FLOOR_RATIO) - 1.0)
    q(torch.linspace(-1, 1, 50)).sum().backward()
    assert q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0  # straight through the floor


@pytest.mark.parametrize("scale", [1e-3, 1e-5, 1e-7, 1e-9])
def test_floor_is_relative_even_for_tiny_calibrated_scales(scale):
    """Issue 9: "the floor is relative to the tensor's scale, not absolute". A freshly calibrated
    quantizer is never at its floor, whatever its scale (ConvNeXt's layer-scale products calibrate
    to ~1e-8: the absolute SCALE_FLOOR must not make the floor equal the calibrated scale)."""
    q = learned(8, scale, -128)
    floor = float(q.log_floor.exp())
    used = float(q.encoding().scale)
    assert not bool(q.floor_hit()), f"calibrated to {used:g}, floor {floor:g}: at the floor before any step"
    assert floor < used, f"floor {floor:g} is not below the calibrated scale {used:g}"
    if used * FLOOR_RATIO >= SCALE_FLOOR:
        assert floor == pytest.approx(used * FLOOR_RATIO, rel=1e-5)


def test_straight_through_clamps_are_exact_for_extreme_values():
    raw = torch.tensor([-1e5, 0.0, 3e-8, 1e38, float("inf")], requires_grad=True)
    used = clamp_straight_through(raw, SCALE_FLOOR, SCALE_CEIL)
    assert used.tolist() == pytest.approx([SCALE_FLOOR, SCALE_FLOOR, SCALE_FLOOR, SCALE_CEIL, SCALE_CEIL])
    used.sum().backward()
    assert raw.grad.tolist() == [1.0] * 5
    off = torch.tensor([1e12, -1e12, -3.5, -2.5, 7.0], requires_grad=True)
    assert round_clamp_straight_through(off, -255.0, 0.0).tolist() == [0.0, -255.0, -4.0, -2.0, 0.0]
