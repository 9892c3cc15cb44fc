"""Quantize-dequantize: the numerics of every quantizer, in vectorized tensor ops.

Contract: the numerics of ONNX ``QuantizeLinear`` -> ``DequantizeLinear``, which is what a
deployment runtime executes (onnxruntime divides; ``torch.fake_quantize_*`` multiply by a
float32 ``1/s`` instead and differ from it by one step on rare ties). For an encoding
``(s, o)`` of ``b`` bits (``o`` an integer, ONNX ``zero_point = -o``):

    r = round(x / s)                    true float32 division, round half to even
    x_hat = s * clamp(r, o, o + 2^b - 1)

``r`` and ``o`` are integers below 2^24, exact in float32, so ``x_hat`` is the float ONNX's
``(saturate(r - o) + o) * s`` gives. Division by a Python float is a true division on CPU;
on CUDA torch turns division by a CPU scalar into multiplication by its reciprocal, so CUDA
callers pass the scale as a device tensor.

Backward (clipped straight-through estimator): the gradient w.r.t. ``x`` passes where ``r``
lies in ``[o, o + 2^b - 1]`` and is zero where the output is clamped.

Learned encodings (LSQ / LSQ+): d/ds is ``r - x/s`` inside and the clip bound (``o`` or
``o + 2^b - 1``) outside; d/do is 0 inside and ``s`` outside; both times ``grad_factor``,
summed over every axis but the channel axis.

Costs (CPU): clamping against Python scalars is vectorized, against tensors it is not (0.02 vs
0.4 ms per million elements), so fixed encodings pass floats. The backward mask is never a
bool tensor (multiplying by one is ~20x slower than by a float): the forward pass saves the
unclamped ``r`` and the backward pass runs ATen's vectorized ``hardtanh_backward(grad, r,
lo - 1/2, hi + 1/2)``. Per quantized tensor: 4 elementwise passes forward, 1 backward.
"""

from __future__ import annotations

import torch

Bound = float | torch.Tensor


def channel_view(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """``t`` of shape ``[C]`` reshaped to broadcast along ``axis`` of an ``ndim``-D tensor
    (``[1, C, 1, 1]`` for axis 1 of a 4-D tensor); unchanged when ``axis`` is None."""
    if axis is None or ndim == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _as_scalar(t: torch.Tensor) -> Bound:
    """A one-element CPU tensor as a Python float (vectorized clamps); other tensors unchanged."""
    return float(t) if t.device.type == "cpu" and t.numel() == 1 else t


def _pass_inside(grad: torch.Tensor, r: torch.Tensor, lo: Bound, hi: Bound,
                 clamped: torch.Tensor | None = None) -> torch.Tensor:
    """``grad`` where the integer-valued ``r`` lies in ``[lo, hi]``, 0 elsewhere."""
    if isinstance(lo, float) and isinstance(hi, float):
        return torch.ops.aten.hardtanh_backward(grad, r, lo - 0.5, hi + 0.5)
    if clamped is None:
        clamped = torch.clamp(r, lo, hi)
    inside = torch.sub(r, clamped).abs_().clamp_(max=1.0).neg_().add_(1.0)  # 1 on the grid, 0 clamped
    return grad * inside


def quantize_dequantize_no_grad(x: torch.Tensor, scale: Bound, lo: Bound, hi: Bound) -> torch.Tensor:
    """The forward value only: ``s * clamp(round(x / s), lo, hi)``."""
    return torch.div(x, scale).round_().clamp_(lo, hi).mul_(scale)


class _FixedFakeQuant(torch.autograd.Function):
    """Fixed encoding; saves the unclamped ``r`` for the clipped STE."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi):
        r = torch.div(x, scale).round_()
        ctx.save_for_backward(r)
        ctx.bounds = (lo, hi)
        return torch.clamp(r, lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return _pass_inside(grad, r, *ctx.bounds), None, None, None


def quantize_dequantize(x: torch.Tensor, scale: Bound, lo: Bound, hi: Bound) -> torch.Tensor:
    """Fake quantization with a fixed encoding: ``s * clamp(round(x / s), lo, hi)``.

    Args:
        x: any float tensor.
        scale: a Python float holding a float32 value (per tensor, CPU), or a float32 tensor
            broadcastable to ``x`` (``[1]``, or ``channel_view``-shaped per channel).
        lo, hi: the integer grid ``[o, o + 2^b - 1]`` as floats (or tensors broadcastable to ``x``).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _FixedFakeQuant.apply(x, scale, lo, hi)
    return quantize_dequantize_no_grad(x, scale, lo, hi)


class _LearnedFakeQuant(torch.autograd.Function):
    """Trainable scale/offset (LSQ/LSQ+); saves ``x`` and recomputes ``x/s`` in backward.

    With ``u = x/s``, ``r = round(u)``, ``c = clamp(r, lo, hi)`` and ``m`` = 1 where ``r = c``:
    d/dx = g*m; d/ds = sum(g*(c - m*u)) (``r - u`` inside, the clip bound ``c`` outside);
    d/do = s*sum(g*(1 - m)); both times ``grad_factor``, summed over ``reduce_dims``.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmax, grad_factor, reduce_dims):
        ctx.save_for_backward(x, scale, offset)
        ctx.qmax, ctx.grad_factor, ctx.reduce_dims = qmax, grad_factor, reduce_dims
        return quantize_dequantize_no_grad(x, _as_scalar(scale), _as_scalar(offset), _as_scalar(offset + qmax))

    @staticmethod
    def backward(ctx, grad):
        x, scale, offset = ctx.saved_tensors
        lo, hi = _as_scalar(offset), _as_scalar(offset + ctx.qmax)
        u = torch.div(x, scale)
        r = torch.round(u)
        c = torch.clamp(r, lo, hi)
        grad_x = _pass_inside(grad, r, lo, hi, c)
        dims, gf = ctx.reduce_dims, ctx.grad_factor
        g_sum = grad.sum(dim=dims, keepdim=True)
        gx_sum = grad_x.sum(dim=dims, keepdim=True)
        d_scale = ((grad * c).sum(dim=dims, keepdim=True) - (grad_x * u).sum(dim=dims, keepdim=True)) * gf
        d_offset = (g_sum - gx_sum) * scale * gf
        return grad_x, d_scale.reshape(scale.shape), d_offset.reshape(offset.shape), None, None, None


def learned_quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int,
                                grad_factor: float, axis: int | None = None) -> torch.Tensor:
    """Fake quantization with trainable ``scale`` (> 0) and integer-valued ``offset``.

    ``scale``/``offset``: shape ``[1]`` (per tensor) or ``[C]`` with ``C = x.shape[axis]``.
    Gradients reach ``x``, ``scale`` and ``offset`` (LSQ / LSQ+, see the module docstring).
    """
    s, o = channel_view(scale, axis, x.dim()), channel_view(offset, axis, x.dim())
    channel_axis = None if axis is None else axis % x.dim()
    dims = tuple(d for d in range(x.dim()) if d != channel_axis)
    if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or o.requires_grad):
        return _LearnedFakeQuant.apply(x, s, o, qmax, grad_factor, dims)
    return quantize_dequantize_no_grad(x, _as_scalar(s), _as_scalar(o), _as_scalar(o + qmax))


class _ClampStraightThrough(torch.autograd.Function):
    """Forward ``clamp(x or round(x), lo, hi)``; backward passes the gradient unchanged.

    (The arithmetic form ``x + (clamp(x) - x).detach()`` cancels catastrophically in float32:
    for x = -1e5 it gives 0, not the floor, and for x = inf it gives NaN.)
    """

    @staticmethod
    def forward(ctx, x, lo, hi, rounded):
        x = x.round() if rounded else x
        return x.clamp(min=lo).clamp(max=hi)  # bounds may mix tensors and floats

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def clamp_straight_through(x: torch.Tensor, lo: Bound, hi: Bound) -> torch.Tensor:
    """``clamp(x, lo, hi)`` forward; the gradient passes unchanged (STE)."""
    return _ClampStraightThrough.apply(x, lo, hi, False)


def round_clamp_straight_through(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(round(x), lo, hi)`` forward; the gradient passes unchanged (STE)."""
    return _ClampStraightThrough.apply(x, lo, hi, True)
