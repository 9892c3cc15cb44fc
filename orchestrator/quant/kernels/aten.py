"""The fused ops' kernels in ATen ops, for every device without a faster one: ``reference.py``'s integer
and float math itself (no second copy of it), adapted to the ops' signatures and output layouts.

The C++ kernel serves CPU tensors and Triton CUDA tensors; these serve the rest (CUDA without Triton,
other devices), the ``python`` backend, and the layouts the Triton wrapper does not run itself.
Shapes: ``x`` any float tensor; ``scale`` one element or ``x``'s rank with every dim dividing ``x``'s
(``reference.py``); ``offset`` one element or the scale's shape.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .. import reference
from ..formats import FORMATS, FloatFormat

ALLOWED_SCALE = ("allowed: one element (per tensor), or x's rank with every dim dividing x's "
                 "(per channel [1, C, 1, 1], per block [C, K / B], per token [..., 1])")


def check_encoding(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
    """One clear error (the C++ kernel's words) for an encoding whose shape does not fit ``x``."""
    fits = scale.numel() == 1 or (scale.dim() == x.dim() and all(
        (n % k == 0) if k > 0 else n == 0 for n, k in zip(x.shape, scale.shape)))
    if not fits:
        raise RuntimeError(f"quantize_dequantize: scale of shape {list(scale.shape)} does not fit x of shape "
                           f"{list(x.shape)}; {ALLOWED_SCALE}")
    if offset.numel() != 1 and offset.shape != scale.shape:
        raise RuntimeError(f"quantize_dequantize: offset of shape {list(offset.shape)} does not fit scale of shape "
                           f"{list(scale.shape)}; allowed: one element or the scale's shape")


def in_layout_of(like: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` with ``like``'s layout (what the fake kernel promises: ``empty_like``)."""
    return result if result.stride() == like.stride() else torch.empty_like(like, dtype=result.dtype).copy_(result)


def _int(qmax: int):
    return reference.format_of("int", qmax)


def forward(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int, grad_factor: float) -> torch.Tensor:
    check_encoding(x, scale, offset)
    return in_layout_of(x, reference.quantize_dequantize(x, scale, offset, _int(qmax)))


def forward_with_mask(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_encoding(x, scale, offset)
    y, inside = reference.quantize_dequantize_with_mask(x, scale, offset, _int(qmax))
    return in_layout_of(x, y), in_layout_of(x, inside)


def backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int,
             grad_factor: float, encoding_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_encoding(x, scale, offset)
    gx, gs, go = reference.quantize_dequantize_backward(grad, x, scale, offset, _int(qmax), grad_factor)
    if not encoding_grads:
        gs, go = torch.zeros_like(scale), torch.zeros_like(offset)
    return in_layout_of(x, gx), gs, go


def mask_gradient(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad`` where the mask is set, else +0, in ``grad``'s layout."""
    return in_layout_of(grad, torch.where(mask, grad, 0.0))


@lru_cache(maxsize=None)
def float_format(mantissa_bits: int, min_exponent: int, max_value: float) -> FloatFormat:
    """The scaled ``formats.FORMATS`` entry the float op's arguments name (one clear error for any other);
    cached: the CUDA kernels check it on every call."""
    for fmt in FORMATS.values():
        if fmt.scaled and (fmt.mantissa_bits, fmt.min_normal_exponent, fmt.max) == (mantissa_bits, min_exponent,
                                                                                     max_value):
            return fmt
    allowed = ", ".join(f"{f.name} ({f.mantissa_bits}, {f.min_normal_exponent}, {f.max:g})"
                        for f in FORMATS.values() if f.scaled)
    raise RuntimeError(f"quantize_dequantize_float: (mantissa_bits, min_exponent, max) = ({mantissa_bits}, "
                       f"{min_exponent}, {max_value:g}) is no scaled float format; allowed: {allowed}")


def float_forward_with_mask(x: torch.Tensor, scale: torch.Tensor, mantissa_bits: int, min_exponent: int,
                            max_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = float_format(mantissa_bits, min_exponent, max_value)
    zero = torch.zeros(1, device=scale.device)
    check_encoding(x, scale, zero)
    y, inside = reference.quantize_dequantize_with_mask(x, scale, zero, fmt)
    return in_layout_of(x, y), in_layout_of(x, inside)


def float_forward(x: torch.Tensor, scale: torch.Tensor, mantissa_bits: int, min_exponent: int,
                  max_value: float) -> torch.Tensor:
    return float_forward_with_mask(x, scale, mantissa_bits, min_exponent, max_value)[0]


def float_learned_forward(x: torch.Tensor, log_scale: torch.Tensor, log_floor: torch.Tensor, mantissa_bits: int,
                          min_exponent: int, max_value: float, grad_factor: float) -> torch.Tensor:
    scale, _ = reference.learned_encoding(log_scale, log_floor, log_scale.new_zeros(1), 0, False)
    return float_forward(x, scale, mantissa_bits, min_exponent, max_value)


def float_learned_backward(grad: torch.Tensor, x: torch.Tensor, log_scale: torch.Tensor, log_floor: torch.Tensor,
                           mantissa_bits: int, min_exponent: int, max_value: float,
                           grad_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dlog_scale = s * dL/ds)`` of the reference's learned op."""
    fmt = float_format(mantissa_bits, min_exponent, max_value)
    zero = log_scale.new_zeros(1)
    scale, _ = reference.learned_encoding(log_scale, log_floor, zero, 0, False)
    check_encoding(x, scale, zero)
    gx, gs, _ = reference.quantize_dequantize_backward(grad, x, scale, zero, fmt, grad_factor)
    return in_layout_of(x, gx), gs * scale
