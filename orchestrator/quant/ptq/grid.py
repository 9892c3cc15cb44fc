"""A weight's integer grid, for the PTQ steps that round weights or choose weight encodings.

A weight quantizer's encoding is its grid: ``w = s * (q + o)``, ``q`` an integer in
``[0, 2^b - 1]``, ``s``/``o`` of shape ``[C]`` along the quantizer's channel axis (``[1]`` per
tensor), or per block (group-wise int4): the full-rank ``[.., C, .., K / B, ..]`` layout of
``granularity.PerBlock``, which ``scale_offset`` repeats over each block's elements. These helpers
go through the quantizer's public API (``encoding``, ``set_encoding``, ``bitwidth``) except
``pin_encoding``, the one place that knows how a weight quantizer that follows its weights keeps a
chosen scale. ``check_integer_grid``: float formats (FP8, FP4) and two-level blocks (LPBQ, MX,
NVFP4) have no integer grid of free scales to round on or search: refused by name.
"""

from __future__ import annotations

import torch

from ..build import ParamEntry
from ..encoding import Encoding, qmax_of
from ..errors import QuantConfigError
from ..formats import IntFormat
from ..granularity import TWO_LEVEL


def check_integer_grid(entries: dict[str, ParamEntry], step: str) -> None:
    """Raise ``QuantConfigError`` (one line) when a weight of ``entries`` (by layer name) is not on a
    plain integer grid (per tensor, per channel or per block)."""
    for name, entry in entries.items():
        q = entry.quantizer
        if not isinstance(q.format, IntFormat) or isinstance(q.granularity, TWO_LEVEL):
            kind = q.granularity.name if isinstance(q.granularity, TWO_LEVEL) else q.format.name
            raise QuantConfigError(f"{step}: the weight of layer {name!r} is quantized as {kind}, which has no "
                                   f"integer grid of free scales to {step} on; allowed: int weights per tensor, "
                                   "per channel or per block (quant.overrides can keep this layer's weight int)")


def channel_shape(enc: Encoding, dim: int) -> list[int]:
    """Shape that broadcasts ``enc.scale`` (``[C]``) against a tensor of ``dim`` dims."""
    shape = [1] * dim
    if enc.axis is not None:
        shape[enc.axis % dim] = -1
    return shape


def current_encoding(entry: ParamEntry) -> Encoding:
    """The encoding the weight of ``entry`` is quantized with now."""
    return entry.quantizer.encoding(entry.values().detach())


def scale_offset(enc: Encoding, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``enc``'s scale and offset shaped to broadcast against ``like``, on its device (per block:
    repeated over each block's elements, ``like``'s shape)."""
    if enc.per_block:
        s, o = enc.scale_for(tuple(like.shape))
        s, o = (t.repeat_interleave(enc.block_size, dim=enc.block_axis) for t in (s, o))
    else:
        shape = channel_shape(enc, like.dim())
        s, o = enc.scale.reshape(shape), enc.offset.reshape(shape)
    return s.to(like.device, like.dtype), o.to(like.device, like.dtype)


def nearest(w: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """``w`` rounded to the nearest point of ``enc``'s grid (clamped), as the quantizer rounds it:
    a true division and ties to even."""
    s, o = scale_offset(enc, w)
    q = torch.clamp(torch.round(w / s) - o, 0, qmax_of(enc.bitwidth))
    return s * (q + o)


def grid_integers(w: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """The grid integers ``q = w / s - o`` of ``w`` (float; whole numbers when ``w`` is on the grid)."""
    s, o = scale_offset(enc, w)
    return w / s - o


@torch.no_grad()
def pin_encoding(entry: ParamEntry, scale: torch.Tensor, offset: torch.Tensor) -> None:
    """Make ``entry``'s quantizer use ``scale``/``offset`` (``[C]``, or the per-block layout) for its
    current weight.

    Learned encodings are set. An encoding that follows the weights (static QAT: recomputed
    from the weights every step as their min-max scale times a per-channel clipping ratio)
    gets the ratio that gives ``scale`` for the current weights, so QAT continues from exactly
    this grid and the grid keeps following the weights as they train. (A ratio may exceed 1
    when rounding pulled a channel's extremes inwards.)
    """
    q = entry.quantizer
    if not getattr(q, "follow", False):
        q.set_encoding(scale, offset)
        return
    values = entry.values().detach()
    q.ratio.fill_(1.0)
    full = q.encoding(values).scale
    q.ratio.copy_((scale.float().reshape(q.ratio.shape) / full.reshape(q.ratio.shape)).to(q.ratio))
