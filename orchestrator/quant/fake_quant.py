"""Quantize-dequantize: the numerics of every quantizer, in vectorized tensor ops.

Forward, for an encoding ``(s, o)`` of ``b`` bits (``o`` an integer, ``zero_point = -o``):
``r = round(x * (1/s))`` (float32 reciprocal, round half to even), ``x_hat = s * clamp(r, o, o + 2^b - 1)``.
This is bit-exact with ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``, which
compute ``(clamp(r - o, 0, 2^b - 1) + o) * s``: ``r`` and ``o`` are integers below 2^24, exact in
float32, so both orders give the same float. The tests hold the two side by side. The ATen CPU
kernels are scalar loops (about 1.6 ms per million elements here); these ops vectorize (about
0.3 ms), which is most of a QAT step's overhead on CPU.

Backward (clipped straight-through estimator): the gradient w.r.t. ``x`` passes where ``r`` lies
in ``[o, o + 2^b - 1]`` and is zero where the output is clamped: ``x`` in ``[min - s/2,
max + s/2)``, i.e. inside ``[min, max]`` plus the half step beyond each end that rounds *to* the
end point (torch.ao's and the LSQ kernels' definition).

Learned encodings (LSQ / LSQ+): d/ds is ``r - x/s`` inside and the clip bound (``o`` or
``o + 2^b - 1``) outside; d/do is 0 inside and ``s`` outside; both times ``grad_factor``. The
scale used is clamped to [SCALE_FLOOR, SCALE_CEIL] and the offset rounded and clamped to ``[-(2^b - 1), 0]``,
both with straight-through gradients, so no optimizer step can make an encoding invalid.

Bounds: with a fixed encoding the caller passes Python floats (clamping against scalars is
vectorized on CPU, against tensors it is not: 0.02 vs 0.4 ms per million elements); learned
encodings pass tensors, turned into floats on CPU (no device to sync with) and kept as tensors
on CUDA. The backward mask is never a bool tensor (multiplying by one is ~20x slower than by a
float on CPU): the forward pass saves the unclamped ``r`` and the backward pass runs ATen's
vectorized ``hardtanh_backward(grad, r, lo - 1/2, hi + 1/2)``, which passes ``grad`` exactly
where the integer ``r`` lies in ``[lo, hi]``. Per quantized tensor: 4 elementwise passes forward,
1 backward.
"""

from __future__ import annotations

import numpy as np
import torch

from .encoding import SCALE_CEIL, SCALE_FLOOR, symmetric_from_range


def reciprocal(scale: torch.Tensor | float) -> torch.Tensor | float:
    """``1/s`` rounded once to float32, as the ATen kernels compute it (a float in, a float out)."""
    if isinstance(scale, torch.Tensor):
        return torch.reciprocal(scale)
    return float(np.float32(1.0) / np.float32(scale))


def _scalar_on_cpu(t: torch.Tensor) -> torch.Tensor | float:
    return float(t) if t.device.type == "cpu" and t.numel() == 1 else t


def _pass_inside(grad: torch.Tensor, r: torch.Tensor, lo, hi, clamped: torch.Tensor | None = None) -> torch.Tensor:
    """``grad`` where the integer-valued ``r`` lies in ``[lo, hi]``, 0 elsewhere."""
    if isinstance(lo, float):
        return torch.ops.aten.hardtanh_backward(grad, r, lo - 0.5, hi + 0.5)
    if clamped is None:
        clamped = torch.clamp(r, lo, hi)
    inside = torch.sub(r, clamped).abs_().clamp_(max=1.0).neg_().add_(1.0)  # 1 on the grid, 0 clamped
    return grad * inside


def quantize_dequantize_no_grad(x: torch.Tensor, scale, lo, hi) -> torch.Tensor:
    """The forward value only: ``s * clamp(round(x * (1/s)), lo, hi)``."""
    return torch.mul(x, reciprocal(scale)).round_().clamp_(lo, hi).mul_(scale)


class _StaticFakeQuant(torch.autograd.Function):
    """Fixed encoding (scalar bounds); saves the unclamped ``r`` for the clipped STE."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi):
        r = torch.mul(x, reciprocal(scale)).round_()
        ctx.save_for_backward(r)
        ctx.bounds = (lo, hi)
        return torch.clamp(r, lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return _pass_inside(grad, r, *ctx.bounds), None, None, None


def quantize_dequantize(x: torch.Tensor, scale, lo, hi) -> torch.Tensor:
    """Fake quantization with a fixed encoding: ``s * clamp(round(x/s), lo, hi)``.

    Args:
        x: any float tensor.
        scale: a float holding a float32 value (per tensor), or a float32 tensor broadcastable
            to ``x`` (``[1]``, or ``[C, 1, ...]`` per channel).
        lo, hi: the integer grid ``[o, o + 2^b - 1]`` as floats (Python scalars).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _StaticFakeQuant.apply(x, scale, lo, hi)
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
        lo, hi = _scalar_on_cpu(offset), _scalar_on_cpu(offset + qmax)
        return quantize_dequantize_no_grad(x, _scalar_on_cpu(scale), lo, hi)

    @staticmethod
    def backward(ctx, grad):
        x, scale, offset = ctx.saved_tensors
        lo, hi = _scalar_on_cpu(offset), _scalar_on_cpu(offset + ctx.qmax)
        u = torch.mul(x, torch.reciprocal(scale))
        r = torch.round(u)
        c = torch.clamp(r, lo, hi)
        grad_x = _pass_inside(grad, r, lo, hi, c)
        dims, gf = ctx.reduce_dims, ctx.grad_factor
        g_sum = grad.sum(dim=dims, keepdim=True)
        gx_sum = grad_x.sum(dim=dims, keepdim=True)
        d_scale = ((grad * c).sum(dim=dims, keepdim=True) - (grad_x * u).sum(dim=dims, keepdim=True)) * gf
        d_offset = (g_sum - gx_sum) * scale * gf
        return grad_x, d_scale.reshape(scale.shape), d_offset.reshape(offset.shape), None, None, None


class _ClampStraightThrough(torch.autograd.Function):
    """Forward ``clamp(x or round(x), lo, hi)``; backward passes the gradient unchanged.

    (The arithmetic form ``x + (clamp(x) - x).detach()`` cancels catastrophically in float32:
    for x = -1e5 it gives 0, not the floor, and for x = inf it gives NaN.)
    """

    @staticmethod
    def forward(ctx, x, lo, hi, rounded):
        return (x.round() if rounded else x).clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def positive_scale(scale: torch.Tensor) -> torch.Tensor:
    """``clamp(scale, SCALE_FLOOR, SCALE_CEIL)`` forward; the gradient passes unchanged (STE)."""
    return _ClampStraightThrough.apply(scale, SCALE_FLOOR, SCALE_CEIL, False)


def valid_offset(offset: torch.Tensor, qmax: int) -> torch.Tensor:
    """``clamp(round(offset), -qmax, 0)`` forward; the gradient passes unchanged (STE)."""
    return _ClampStraightThrough.apply(offset, -qmax, 0, True)


def learned_quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int,
                                grad_factor: float, per_channel: bool = False) -> torch.Tensor:
    """Fake quantization with trainable ``scale`` and ``offset`` (LSQ / LSQ+).

    Per tensor: ``scale``/``offset`` shape ``[1]``. Per channel (axis 0): shape ``[C]``.
    """
    s, o = positive_scale(scale), valid_offset(offset, qmax)
    if per_channel:
        view = (-1,) + (1,) * (x.dim() - 1)
        s, o = s.reshape(view), o.reshape(view)
        dims = tuple(range(1, x.dim()))
    else:
        dims = tuple(range(x.dim()))
    if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or o.requires_grad):
        return _LearnedFakeQuant.apply(x, s, o, qmax, grad_factor, dims)
    lo, hi = _scalar_on_cpu(o), _scalar_on_cpu(o + qmax)
    return quantize_dequantize_no_grad(x, _scalar_on_cpu(s), lo, hi)


@torch.no_grad()
def weight_scale(w: torch.Tensor, bitwidth: int, per_channel: bool) -> torch.Tensor:
    """Symmetric min-max scale of a weight, shape ``[C_out]`` (per channel) or ``[1]``.

    ``w`` has its output channels on axis 0 (Conv1d/2d ``[C_out, C_in, *k]``, Linear ``[C_out, C_in]``).
    """
    if per_channel:
        wmin, wmax = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
    else:
        wmin, wmax = torch.aminmax(w)
        wmin, wmax = wmin.reshape(1), wmax.reshape(1)
    return symmetric_from_range(wmin, wmax, bitwidth)[0]
