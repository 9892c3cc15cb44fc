"""Encodings: the scale/offset of a b-bit integer grid, AIMET's convention.

A ``b``-bit encoding maps the integer ``q`` in ``[0, 2^b - 1]`` to ``x = s * (q + o)``, so
``min = s*o`` and ``max = s*(o + 2^b - 1)``. Symmetric encodings have ``o = -2^(b-1)``;
asymmetric ones have an integer ``o`` in ``[-(2^b - 1), 0]`` so that the range contains 0.

Scales and offsets are 1-D float32 tensors with one entry per channel (one entry for a
per-tensor encoding). The ATen fake-quant ops use ``zero_point = -o``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest scale any encoding may have (float32 machine epsilon, as torch.ao uses): keeps
# ``x / s`` finite for any finite activation and makes ``min < max`` hold for every encoding.
SCALE_FLOOR = torch.finfo(torch.float32).eps
# ``Encoding.axis`` of a per-channel encoding read from a file that does not record its axis.
AXIS_UNKNOWN = -1
# Largest scale any encoding may have: s * (o + 2^16 - 1) stays finite in float32.
SCALE_CEIL = torch.finfo(torch.float32).max / 2**16


def qmax_of(bitwidth: int) -> int:
    """Largest integer of a ``bitwidth``-bit unsigned grid, ``2^b - 1``."""
    return (1 << bitwidth) - 1


def symmetric_offset(bitwidth: int) -> int:
    """Offset of a symmetric encoding, ``-2^(b-1)``."""
    return -(1 << (bitwidth - 1))


@dataclass(frozen=True)
class Encoding:
    """One quantizer's encoding; ``scale``/``offset`` have shape ``[C]`` (C=1 per tensor).

    ``axis``: the channel axis of the tensor it quantizes (None: per tensor).
    ``dtype``: the format, ``"int"`` or a ``formats.FORMATS`` name (float encodings: offset 0).
    Per block (``block_size`` set): scales per channel on ``axis`` and per ``block_size``
    elements along ``block_axis``; ``scale``/``offset`` hold them in the full-rank layout
    (``granularity.py``) or flattened row-major as a file stores them (``scale_for(shape)``).
    ``dynamic``: computed per token at run time (no values stored).
    Two-level blocks (``block_scales.py``): ``scheme`` ``"lpbq"``/``"mx"``/``"nvfp4"``; ``scale`` is
    the effective per-block scale, ``inner`` what each block stores (LPBQ integers, MX exponents,
    NVFP4 e4m3 values) and ``outer`` the float scale above them (LPBQ per channel, full rank;
    NVFP4 one element), both in the layout of ``scale``; ``scale_bitwidth``: LPBQ's integer bits.
    """

    bitwidth: int
    symmetric: bool
    scale: torch.Tensor
    offset: torch.Tensor
    axis: int | None = None
    dtype: str = "int"
    block_axis: int | None = None
    block_size: int | None = None
    dynamic: bool = False
    scheme: str | None = None
    inner: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    scale_bitwidth: int | None = None

    @property
    def per_block(self) -> bool:
        return self.block_size is not None

    def block_scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The full-rank scale shape of this per-block encoding on a tensor of ``shape``."""
        out = [1] * len(shape)
        out[self.axis] = shape[self.axis]
        out[self.block_axis] = shape[self.block_axis] // self.block_size
        return tuple(out)

    def scale_for(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` in the full-rank layout for a tensor of ``shape`` (per block only)."""
        target = self.block_scale_shape(tuple(shape))
        return self.scale.reshape(target), self.offset.reshape(target)

    @property
    def min(self) -> torch.Tensor:
        """Smallest representable value per channel, ``s*o``; shape ``[C]``."""
        return self.scale * self.offset

    @property
    def max(self) -> torch.Tensor:
        """Largest representable value per channel, ``s*(o + 2^b - 1)``; shape ``[C]``."""
        return self.scale * (self.offset + qmax_of(self.bitwidth))

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


def asymmetric_from_range(
    rmin: torch.Tensor, rmax: torch.Tensor, bitwidth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of the asymmetric grid covering ``[rmin, rmax]`` (widened to hold 0).

    ``s = (max - min) / (2^b - 1)`` (at least SCALE_FLOOR) and ``o = round(min / s)``, clamped
    to ``[-(2^b - 1), 0]`` so that 0 is exactly representable. Shapes: ``[C]`` in, ``[C]`` out.
    """
    qmax = qmax_of(bitwidth)
    rmin = torch.clamp(rmin.float(), max=0.0)
    rmax = torch.clamp(rmax.float(), min=0.0)
    scale = torch.clamp((rmax - rmin) / qmax, min=SCALE_FLOOR)
    offset = torch.clamp(torch.round(rmin / scale), -qmax, 0)
    return scale, offset


def symmetric_from_range(
    rmin: torch.Tensor, rmax: torch.Tensor, bitwidth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of the symmetric grid covering ``[rmin, rmax]``.

    ``o = -2^(b-1)`` and ``s = max(max / (2^(b-1) - 1), -min / 2^(b-1))`` (at least
    SCALE_FLOOR). Shapes: ``[C]`` in, ``[C]`` out.
    """
    half = 1 << (bitwidth - 1)
    scale = torch.maximum(rmax.float() / (half - 1), rmin.float() / -half)  # = -min / half, one op fewer
    scale = scale.clamp_(min=SCALE_FLOOR)
    return scale, torch.full_like(scale, float(-half))
