"""Two-level block scales: the rules that turn each block's range into the scale it quantizes with.

A two-level granularity (``granularity.LPBQ``, ``MX``, ``NVFP4``) quantizes like ``PerBlock``, one
scale per (output channel, block of input elements), with the reference's numerics (``reference.py``):
only the *scale* is constrained, to what the target stores. These functions compute that
effective scale (float32, the full-rank block layout ``[.., C, .., K / B, ..]``) and its stored
parts. All shapes below are of that layout; ``amax`` is the block's largest magnitude.

LPBQ (AIMET's low-power blockwise quantization, ``GroupedBlockQuantizeDequantize`` with
``block_grouping = -1`` along the block axis; symmetric integer elements of ``b`` bits,
integer block scales of ``sb = decompressed_bw - b`` bits)::

    raw    = the symmetric per-block scale (amax / (2^(b-1) - 1), times the calibrated clip ratio)
    s_c    = max over the channel's blocks of raw / 2^sb            per channel, float32
    i      = clamp(round(raw / s_c), 1, 2^sb)                       per block, integer, half to even
    scale  = i * s_c

MX (OCP Microscaling v1.0, section 6.3, torchao ``to_mx`` with ``ScaleCalculationMode.FLOOR``;
``emax`` the exponent of the element format's largest normal: e4m3 8, e5m2 15, e2m1 2, int8 0)::

    X      = clamp(floor(log2(amax)) - emax, -127, 127)             E8M0 exponent (amax = 0: -127)
    scale  = 2^X                  (MXINT8: 2^(X - 6), its elements being k * 2^-6, k in [-128, 127])

NVFP4 (NVIDIA's two-level FP4, torchao ``nvfp4_quantize`` with a per-tensor scale)::

    s_t    = amax(tensor) / (448 * 6)                               per tensor, float32 (all-zero: 1)
    q      = cast_e4m3(clamp(amax / 6 / s_t, 2^-6, 448))            per block, an e4m3 value
    scale  = s_t * q

The elements are then ``scale * Q(x / scale)`` in the element format (saturating, round half to
even), exactly the reference op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .formats import FORMATS, Format, IntFormat

E8M0_MIN_EXPONENT = -127
E8M0_MAX_EXPONENT = 127
MXINT8_UNIT_EXPONENT = -6  # an MXINT8 element k means k * 2^-6
NVFP4_ELEMENT = FORMATS["float4_e2m1"]
NVFP4_SCALE = FORMATS["float8_e4m3fn"]
NVFP4_SCALE_MIN = 2.0**-6  # torchao clamps block scales to e4m3's smallest normal


class BlockScales(NamedTuple):
    """``scale``: the effective per-block scale; ``inner``: what each block stores (LPBQ's integers,
    NVFP4's e4m3 values, MX's E8M0 exponents ``X``); ``outer``: the float scale above them (LPBQ per
    channel, full rank with 1 on the block axis; NVFP4 per tensor, one element; MX none)."""

    scale: torch.Tensor
    inner: torch.Tensor
    outer: torch.Tensor | None


def lpbq_scales(raw: torch.Tensor, block_axis: int, scale_bitwidth: int) -> BlockScales:
    """LPBQ's compression of per-block scales ``raw`` (module docstring)."""
    levels = float(1 << scale_bitwidth)
    channel = raw.float().amax(dim=block_axis, keepdim=True) / levels
    ints = torch.clamp(torch.round(raw.float() / channel), 1.0, levels)
    return BlockScales(ints * channel, ints, channel)


def element_max_exponent(fmt: Format) -> int:
    """``emax`` of an MX element format: the exponent of its largest normal value (int8: 0)."""
    if isinstance(fmt, IntFormat):
        return 0
    return math.floor(math.log2(fmt.max))


def mx_scales(amax: torch.Tensor, fmt: Format) -> BlockScales:
    """MX's shared power-of-two scale per block (module docstring); ``inner`` holds ``X``."""
    _, k = torch.frexp(amax.float())  # amax = f * 2^k, f in [0.5, 1): floor(log2(amax)) = k - 1, exactly
    exponent = torch.where(amax > 0, k - 1, torch.full_like(k, E8M0_MIN_EXPONENT))
    x = (exponent - element_max_exponent(fmt)).clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    unit = MXINT8_UNIT_EXPONENT if isinstance(fmt, IntFormat) else 0
    scale = torch.ldexp(torch.ones_like(amax, dtype=torch.float32), x + unit)
    return BlockScales(scale, x.to(torch.float32), None)


def nvfp4_scales(amax: torch.Tensor, tensor_amax: torch.Tensor) -> BlockScales:
    """NVFP4's e4m3 block scales under the per-tensor float32 scale (module docstring)."""
    tensor_amax = tensor_amax.float().reshape([1] * amax.dim())
    per_tensor = torch.where(tensor_amax > 0, tensor_amax / (NVFP4_SCALE.max * NVFP4_ELEMENT.max),
                             torch.ones_like(tensor_amax))
    block = amax.float() / NVFP4_ELEMENT.max / per_tensor
    q = block.clamp(NVFP4_SCALE_MIN, NVFP4_SCALE.max).to(NVFP4_SCALE.torch_dtype).float()
    return BlockScales(per_tensor * q, q, per_tensor)
