"""Quantize-dequantize: the numerics contract every quantizer follows, and the call into the fused op.

Contract: the numerics of ONNX ``QuantizeLinear`` -> ``DequantizeLinear``, which is what a
deployment runtime executes (onnxruntime divides; ``torch.fake_quantize_*`` multiply by a
float32 ``1/s`` instead and differ from it by one step on rare ties). For an encoding
``(s, o)`` of ``b`` bits (``o`` an integer, ONNX ``zero_point = -o``):

    r = round(x / s)                    true float32 division, round half to even
    x_hat = s * clamp(r, o, o + 2^b - 1)

``r`` and ``o`` are integers below 2^24, exact in float32, so ``x_hat`` is the float ONNX's
``(saturate(r - o) + o) * s`` gives.

Backward (clipped straight-through estimator): the gradient w.r.t. ``x`` passes where ``r``
lies in ``[o, o + 2^b - 1]`` and is zero where the output is clamped.

Learned encodings (LSQ / LSQ+): d/ds is ``r - x/s`` inside and the clip bound (``o`` or
``o + 2^b - 1``) outside; d/do is 0 inside and ``s`` outside; both times ``grad_factor``,
summed over each scale element's block.

Encodings in ``reference.py``'s layout (every granularity): one element, or ``x``'s rank with every
dim dividing ``x``'s (per channel ``[1, C, 1, 1]``, per block ``[C, K / B]``, per token ``[..., 1]``);
``granularity.full_rank_scale`` turns a 1-D ``[C]`` along an axis into it.

All of it is one op, ``torch.ops.qat.quantize_dequantize`` (``kernels/``): one pass forward,
one backward, the encoding gradients only when the encodings require them; bit for bit the
reference's integer format (``reference.py``). ``fake_quantize_format`` calls the op for any
format: the float formats with a fixed scale run the fused float op of the ``cpp`` kernels
(``quantize_dequantize_float``, bit for bit the reference's float formats), the rest the reference op;
``fake_quantize_float_learned`` is range learning on a float format.
"""

from __future__ import annotations

import torch

from . import kernels
from .formats import FloatFormat, Format, IntFormat
from .reference import fake_quantize_general

_OP = None


def _op():
    global _OP
    if _OP is None:
        kernels.backend()
        _OP = torch.ops.qat.quantize_dequantize
    return _OP


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int, *,
                  grad_factor: float = 1.0) -> torch.Tensor:
    """``s * clamp(round(x / s), o, o + qmax)`` with the clipped STE; LSQ gradients reach ``scale``
    and ``offset`` when they require grad.

    Args:
        x: any float tensor (computed in float32; the result has ``x``'s dtype).
        scale: float32, positive; one element or ``x``'s rank, each dim dividing ``x``'s (module docstring).
        offset: float32 integers in ``[-qmax, 0]``; one element or the scale's shape.
        qmax: ``2^b - 1``.
        grad_factor: multiplies the encodings' gradients (LSQ's ``1/sqrt(N * qmax)``).
    """
    return _op()(x, scale, offset, qmax, grad_factor)


_LEARNED = None


def fake_quantize_learned(x: torch.Tensor, log_scale: torch.Tensor, log_floor: torch.Tensor, offset: torch.Tensor,
                          qmax: int, grad_factor: float, learn_offset: bool) -> torch.Tensor:
    """``fake_quantize`` with the encoding of range learning, in one op: ``s = exp(log_scale)``
    floored at ``exp(log_floor)`` (straight through) and, with ``learn_offset``, the offset rounded
    and clamped to ``[-qmax, 0]`` (straight through). Gradients reach ``log_scale`` (``s * d/ds``)
    and ``offset``. ``log_scale``/``log_floor``/``offset`` in the scale layout of ``fake_quantize``."""
    global _LEARNED
    if _LEARNED is None:
        kernels.backend()
        _LEARNED = torch.ops.qat.quantize_dequantize_learned
    return _LEARNED(x, log_scale, log_floor, offset, qmax, grad_factor, learn_offset)


class _ClampStraightThrough(torch.autograd.Function):
    """Forward ``clamp(x or round(x), lo, hi)``; backward passes the gradient unchanged.

    (The arithmetic form ``x + (clamp(x) - x).detach()`` cancels catastrophically in float32
    for large ``|x|``; this one is exact.)
    """

    @staticmethod
    def forward(ctx, x, lo, hi, rounded):
        x = x.round() if rounded else x
        return x.clamp(min=lo).clamp(max=hi)  # bounds may mix tensors and floats

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def clamp_straight_through(x: torch.Tensor, lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
    """``clamp(x, lo, hi)`` forward; the gradient passes unchanged (STE)."""
    return _ClampStraightThrough.apply(x, lo, hi, False)


def round_clamp_straight_through(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(round(x), lo, hi)`` forward; the gradient passes unchanged (STE)."""
    return _ClampStraightThrough.apply(x, lo, hi, True)


def fake_quantize_format(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Quantize-dequantize ``x`` on format ``fmt``'s grid with a fixed or computed encoding (no encoding
    gradients asked for), in the layout of ``fake_quantize``: integer formats and, on the ``cpp``
    kernels, the scaled float formats run a fused op that saves a 1-byte mask for backward; casts
    (fp16/bf16), the ``python`` kernels and scales that require grad run the reference op."""
    if isinstance(fmt, IntFormat):
        return fake_quantize(x, scale, offset, fmt.qmax)
    if fmt.scaled and not scale.requires_grad and kernels.backend() == "cpp":
        return torch.ops.qat.quantize_dequantize_float(x, scale, fmt.mantissa_bits, fmt.min_normal_exponent, fmt.max)
    return fake_quantize_general(x, scale, offset, fmt)


def fake_quantize_float_learned(x: torch.Tensor, log_scale: torch.Tensor, log_floor: torch.Tensor, fmt: FloatFormat,
                                grad_factor: float) -> torch.Tensor:
    """Range learning on a scaled float format (``s = exp(log_scale)`` floored at ``exp(log_floor)``,
    straight through; no offset) in one op: the fused float op on the ``cpp`` kernels, the
    reference's learned op otherwise. ``log_scale``/``log_floor`` in the layout of ``fake_quantize``."""
    if kernels.backend() == "cpp":
        return torch.ops.qat.quantize_dequantize_float_learned(x, log_scale, log_floor, fmt.mantissa_bits,
                                                               fmt.min_normal_exponent, fmt.max, grad_factor)
    return torch.ops.qat.quantize_dequantize_general_learned(x, log_scale, log_floor, torch.zeros_like(log_scale),
                                                             fmt.name, fmt.qmax, grad_factor, False)
