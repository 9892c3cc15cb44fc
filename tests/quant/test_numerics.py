"""Quantizer numerics: bit-exact with the ATen fake-quant ops, the contract's formulas, clipped STE."""

from __future__ import annotations

import pytest
import torch

from orchestrator.quant import ActivationQuantizer, WeightQuantizer
from orchestrator.quant.encoding import asymmetric_from_range, qmax_of, symmetric_from_range
from orchestrator.quant.fake_quant import weight_scale


def reference_qdq(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bitwidth: int) -> torch.Tensor:
    """The contract, written out: q = clamp(round(x/s) - o, 0, 2^b-1), x_hat = s*(q + o).

    ``x/s`` is computed as ``x * (1/s)`` in float32, as the fused kernels do; scale/offset
    broadcast against ``x`` (shape ``[C, 1, ...]`` for per-channel).
    """
    inv = 1.0 / scale
    q = torch.clamp(torch.round(x * inv) - offset, 0, qmax_of(bitwidth))
    return scale * (q + offset)


def inputs_with_ties(scale: float, offset: int, bitwidth: int, n: int = 4000) -> torch.Tensor:
    """Random values over (and beyond) the grid plus exact .5 ties, exactly representable."""
    gen = torch.Generator().manual_seed(bitwidth)
    lo, hi = scale * offset, scale * (offset + qmax_of(bitwidth))
    span = hi - lo
    rand = torch.rand(n, generator=gen) * (span * 1.4) + (lo - span * 0.2)
    k = torch.randint(int(offset) - 2, int(offset) + qmax_of(bitwidth) + 2, (n,), generator=gen).float()
    ties = (k + 0.5) * scale
    return torch.cat([rand, ties, torch.tensor([0.0, lo, hi])])


@pytest.mark.parametrize("bitwidth", [2, 3, 4, 5, 8, 12, 16])
def test_activation_quantizer_is_bit_exact_with_aten_and_contract(bitwidth):
    scale, offset = 2.0**-5, -(qmax_of(bitwidth) // 3)  # power-of-two scale: ties are exact
    q = ActivationQuantizer("t", bitwidth, learnable=False)
    q.set_encoding(torch.tensor([scale]), torch.tensor([float(offset)]))
    x = inputs_with_ties(scale, offset, bitwidth)
    ties = x[4000:-3]
    assert torch.equal(ties / scale - torch.floor(ties / scale), torch.full_like(ties, 0.5))
    ours = q(x)
    aten = torch.fake_quantize_per_tensor_affine(x, scale, -offset, 0, qmax_of(bitwidth))
    assert torch.equal(ours, aten)
    assert torch.equal(ours, reference_qdq(x, torch.tensor(scale), torch.tensor(float(offset)), bitwidth))


def test_ties_round_half_to_even():
    q = ActivationQuantizer("t", 8, learnable=False)
    q.set_encoding(torch.tensor([1.0]), torch.tensor([-128.0]))
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert q(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


@pytest.mark.parametrize("bitwidth", [2, 4, 8, 16])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_quantizer_is_bit_exact_with_aten_per_channel(bitwidth, per_channel):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, 3, 3, generator=gen) * torch.linspace(0.1, 2.0, 6).reshape(6, 1, 1, 1)
    wq = WeightQuantizer(bitwidth, channels=6, per_channel=per_channel, learnable=False)
    scale = weight_scale(w, bitwidth, per_channel)
    half = 1 << (bitwidth - 1)
    # ties: put exact half-steps into the weight
    w[0, 0, 0, :] = scale[0] * torch.tensor([0.5, 1.5, -2.5])
    scale = weight_scale(w, bitwidth, per_channel)
    if per_channel:
        aten = torch.fake_quantize_per_channel_affine(
            w, scale, torch.full((6,), half, dtype=torch.int32), 0, 0, qmax_of(bitwidth))
        ref = reference_qdq(w, scale.reshape(6, 1, 1, 1), torch.tensor(float(-half)), bitwidth)
    else:
        aten = torch.fake_quantize_per_tensor_affine(w, float(scale), half, 0, qmax_of(bitwidth))
        ref = reference_qdq(w, scale, torch.tensor(float(-half)), bitwidth)
    assert torch.equal(wq(w), aten)
    assert torch.equal(wq(w), ref)


@pytest.mark.parametrize("bitwidth", [2, 4, 8, 16])
def test_symmetric_weight_scale_formula(bitwidth):
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
        q = ActivationQuantizer("t", bw, learnable=False)
        q.set_encoding(s, o)
        assert float(q(torch.zeros(1))) == 0.0
        enc = q.encoding()
        assert float(enc.min) <= min(rmin, 0.0) + float(s) and float(enc.max) >= max(rmax, 0.0) - float(s)


def test_clipped_ste_gradient():
    q = ActivationQuantizer("t", 4, learnable=False)
    q.set_encoding(torch.tensor([0.25]), torch.tensor([-4.0]))  # grid [-1.0, 2.75]
    x = torch.tensor([-2.0, -1.2, -1.0, 0.3, 2.75, 2.8, 2.9, 4.0], requires_grad=True)
    q(x).sum().backward()
    # inside [min, max] (and the half step that rounds onto an end point): 1; clipped: 0
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_gradients_match_the_formulas():
    bw, s, o = 4, 0.25, -4.0
    q = ActivationQuantizer("t", bw, learnable=True, grad_scaling=False)
    q.set_encoding(torch.tensor([s]), torch.tensor([o]))
    x = torch.tensor([[-2.0, -0.8, 0.3, 1.1, 2.6, 5.0]], requires_grad=True)
    q(x).sum().backward()
    u = x.detach() / s
    lo, hi = o, o + qmax_of(bw)
    inside = (torch.round(u) >= lo) & (torch.round(u) <= hi)
    expected_ds = torch.where(inside, torch.round(u) - u, torch.where(torch.round(u) < lo, lo, hi)).sum()
    expected_do = torch.where(inside, 0.0, s).sum()
    assert torch.allclose(q.scale.grad, expected_ds.reshape(1), atol=1e-5)
    assert torch.allclose(q.offset.grad, expected_do.reshape(1))


def test_lsq_gradient_scaling_factor():
    x = torch.randn(8, 3, 4, 4)
    grads = []
    for scaling in (False, True):
        q = ActivationQuantizer("t", 8, learnable=True, grad_scaling=scaling)
        q.set_encoding(torch.tensor([0.01]), torch.tensor([-128.0]))
        q(x).sum().backward()
        grads.append(q.scale.grad.clone())
    per_sample = 3 * 4 * 4
    assert torch.allclose(grads[1], grads[0] / (per_sample * 255) ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("bitwidth", [2, 4, 8, 16])
def test_learned_quantizer_matches_aten_learnable_op(bitwidth):
    """Forward bit-exact with torch's LSQ kernel (ties included); gradients equal away from exact ties.

    At an exact .5 tie just outside the grid the kernels differ on purpose: torch's learnable
    kernel rounds ``x/s + zero_point`` while the contract (and torch's static kernel) rounds
    ``x/s`` first, so e.g. ``u = o + qmax + 0.5`` rounds (half to even) onto the grid here.
    """
    qmax = qmax_of(bitwidth)
    scale, offset = 2.0**-4, -(qmax // 3)
    q = ActivationQuantizer("t", bitwidth, learnable=True, grad_scaling=False)
    q.set_encoding(torch.tensor([scale]), torch.tensor([float(offset)]))

    def both(x):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        q.zero_grad()
        s_ref = torch.tensor([scale], requires_grad=True)
        zp_ref = torch.tensor([float(-offset)], requires_grad=True)
        ours = q(xa)
        ref = torch._fake_quantize_learnable_per_tensor_affine(xb, s_ref, zp_ref, 0, qmax, 1.0)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        ours.backward(g)
        ref.backward(g)
        return ours, ref, xa.grad, xb.grad, (q.scale.grad, s_ref.grad), (q.offset.grad, -zp_ref.grad)

    with_ties = inputs_with_ties(scale, offset, bitwidth, n=3000)
    ours, ref, *_ = both(with_ties)
    assert torch.equal(ours, ref)
    no_ties = with_ties[:3000]  # the random part: no exact .5 ties
    _, _, gx, gx_ref, (gs, gs_ref), (go, go_ref) = both(no_ties)
    assert torch.equal(gx, gx_ref)
    assert torch.allclose(gs, gs_ref, rtol=1e-4, atol=1e-3)
    assert torch.allclose(go, go_ref, rtol=1e-5)
    tie_above = torch.tensor([scale * (offset + qmax + 0.5)], requires_grad=True)
    q(tie_above).sum().backward()
    on_grid = (offset + qmax) % 2 == 0  # half to even: the tie rounds onto the top grid point
    assert tie_above.grad.item() == (1.0 if on_grid else 0.0)


def test_learned_per_channel_weight_matches_aten():
    w = torch.randn(5, 3, 3, 3)
    wq = WeightQuantizer(4, channels=5, per_channel=True, learnable=True, grad_scaling=False)
    wq.init_from_weight(w)
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    s_ref = wq.scale.detach().clone().requires_grad_()
    ours = wq(wa)
    ref = torch._fake_quantize_learnable_per_channel_affine(wb, s_ref, torch.full((5,), 8.0), 0, 0, 15, 1.0)
    assert torch.equal(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.equal(wa.grad, wb.grad)
    assert torch.allclose(wq.scale.grad, s_ref.grad, rtol=1e-4, atol=1e-4)


def test_straight_through_clamps_are_exact_for_extreme_parameters():
    from orchestrator.quant.encoding import SCALE_CEIL, SCALE_FLOOR
    from orchestrator.quant.fake_quant import positive_scale, valid_offset

    raw = torch.tensor([-1e5, 0.0, 3e-8, 1e38, float("inf")], requires_grad=True)
    used = positive_scale(raw)
    assert used.tolist() == pytest.approx([SCALE_FLOOR, SCALE_FLOOR, SCALE_FLOOR, SCALE_CEIL, SCALE_CEIL])
    used.sum().backward()
    assert raw.grad.tolist() == [1.0] * 5
    off = torch.tensor([1e12, -1e12, -3.5, -2.5, 7.0], requires_grad=True)
    assert valid_offset(off, 255).tolist() == [0.0, -255.0, -4.0, -2.0, 0.0]
