"""Granularities: which elements of a tensor share one scale. The granularity *is* the scale's shape.

A scale (and offset) tensor either has one element (per tensor) or the rank of the tensor ``x``
it quantizes, each dim dividing ``x``'s: element ``x[i0, i1, ...]`` uses
``scale[i0 // B0, i1 // B1, ...]`` with block sizes ``Bd = x.shape[d] // scale.shape[d]``
(ONNX's blocked ``QuantizeLinear``, AIMET's ``QuantizeDequantize(shape, block_size)``,
FastForward's tiles). Per-channel scales are also kept in the older 1-D ``[C]`` layout with an
``axis`` (``quantizer.py``), which ``full_rank_scale`` turns into this one.

- ``PerTensor()``: scale shape ``[1]``.
- ``PerChannel(axis)``: ``[C]`` along ``axis``; full rank ``[1, .., C, .., 1]``.
- ``PerBlock(axis, block_axis, block_size)``: one scale per output channel (``axis``) and per
  ``block_size`` consecutive elements along ``block_axis`` (the input dimension: group-wise
  int4 g32/g64/g128); every other dim shares (a conv's kernel positions share their block's
  scale). Shape ``[.., C, .., K / block_size, .., 1]``. ``block_size`` larger than the dim: one
  block per row (the dim's size). A dim that is not a multiple of ``block_size`` (a partial last
  block) is rejected with ``ValueError`` naming both.
- Two-level blocks, ``PerBlock`` whose scale is constrained to what the target stores
  (``block_scales.py`` has the rules): ``LPBQ(.., scale_bitwidth)`` (AIMET's low-power blockwise
  quantization: integer block scales under a float per-channel scale), ``MX(.., block_size=32)``
  (OCP Microscaling: a power-of-two E8M0 scale per block), ``NVFP4(.., block_size=16)`` (e4m3
  block scales under a float32 per-tensor scale). ``scales(raw, amax, fmt)`` gives the block
  scales from each block's plain symmetric scale ``raw`` and largest magnitude ``amax``. A dim
  smaller than the block is one block (as if zero-padded, which leaves every block maximum as it
  is); a dim that is not a multiple of it is rejected, as for ``PerBlock``.
- ``PerToken()``: dynamic activations: one scale per token, computed at run time from that
  token's values (the last dim reduced); shape ``[..., 1]``.
- ``PerTokenBlocks(rule, block_size)``: dynamic activations in a two-level block format (``MX``,
  ``NVFP4`` as ``rule``): blocks of ``block_size`` consecutive elements along the last dim, each
  block's scale computed at run time from its own values by the format's rule (NVFP4's per-tensor
  scale from the whole tensor, as torchao's dynamic NVFP4 activations); shape ``[..., ceil(K / B)]``.
  A last dim that is not a multiple of the block ends in a partial block, quantized as if
  zero-padded (the OCP MX spec's padding: zeros leave the block's maximum as it is).

``WeightAxes(channel, block)``: the output-channel axis and the input (reduction) axis of a layer
type's weight, declared once per registered layer type (``layers/``) and per functional op
(``placement.PARAM_AXIS``), so per-channel and per-block quantization read the same declaration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_scales import BlockScales, lpbq_scales, mx_scales, nvfp4_scales


class WeightAxes(int):
    """A weight's output-channel axis (the int value itself, so code reading a bare channel axis
    keeps working) that also names ``block``, the input axis along which blocks run."""

    def __new__(cls, channel: int, block: int) -> "WeightAxes":
        obj = super().__new__(cls, channel)
        obj.block = block
        return obj

    def __getnewargs__(self) -> tuple[int, int]:
        return int(self), self.block

    @property
    def channel(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"WeightAxes(channel={int(self)}, block={self.block})"


LINEAR = WeightAxes(0, 1)  # Linear [out, in]; Conv [out, in, *k]; Embedding [rows, dim]; MHA projections
TRANSPOSED = WeightAxes(1, 0)  # ConvTranspose [in, out / groups, *k]; HF Conv1D [in, out]
MATMUL_B = WeightAxes(-1, -2)  # the B operand of matmul/mm/addmm: [..., in, out]
STACKED_RNN = WeightAxes(1, 2)  # a bidirectional RNN's two directions stacked: [2, rows, in]


def weight_axes(declared: int | None, rank: int) -> WeightAxes | None:
    """A declaration as ``WeightAxes`` normalised to ``rank`` dims; a bare int channel axis ``a``
    (an undeclared input axis) means input axis 1 for ``a = 0``, else ``a - 1``."""
    if declared is None:
        return None
    block = declared.block if isinstance(declared, WeightAxes) else (1 if declared % rank == 0 else declared % rank - 1)
    return WeightAxes(declared % rank, block % rank)


@dataclass(frozen=True)
class PerTensor:
    name = "per_tensor"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,)


@dataclass(frozen=True)
class PerChannel:
    axis: int
    name = "per_channel"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[self.axis],)


@dataclass(frozen=True)
class PerBlock:
    axis: int
    block_axis: int
    block_size: int
    name = "per_block"

    def effective_block(self, shape: tuple[int, ...]) -> int:
        """The block size used on ``shape``: ``block_size``, or the whole dim when that is smaller."""
        return min(self.block_size, shape[self.block_axis])

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        size = shape[self.block_axis]
        block = self.effective_block(shape)
        if size % block:
            raise ValueError(f"dim {self.block_axis} of size {size} is not a multiple of block_size={block}; "
                             f"allowed: a block size dividing {size} (or one >= {size}: one block per row)")
        out = [1] * len(shape)
        out[self.axis] = shape[self.axis]
        out[self.block_axis] = size // block
        return tuple(out)


@dataclass(frozen=True)
class LPBQ(PerBlock):
    """AIMET's LPBQ: ``scale_bitwidth``-bit integer block scales (AIMET's ``decompressed_bw - bitwidth``)."""

    scale_bitwidth: int = 4
    name = "lpbq"

    def scales(self, raw: torch.Tensor, amax: torch.Tensor, fmt) -> BlockScales:
        return lpbq_scales(raw, self.block_axis, self.scale_bitwidth)


@dataclass(frozen=True)
class MX(PerBlock):
    """OCP MX: one E8M0 (power-of-two) scale per ``block_size`` (32) elements."""

    name = "mx"

    @staticmethod
    def scales(raw: torch.Tensor | None, amax: torch.Tensor, fmt) -> BlockScales:
        return mx_scales(amax, fmt)


@dataclass(frozen=True)
class NVFP4(PerBlock):
    """NVFP4: one e4m3 scale per ``block_size`` (16) elements under a float32 per-tensor scale."""

    name = "nvfp4"

    @staticmethod
    def scales(raw: torch.Tensor | None, amax: torch.Tensor, fmt) -> BlockScales:
        return nvfp4_scales(amax, amax.amax())


TWO_LEVEL = (LPBQ, MX, NVFP4)


@dataclass(frozen=True)
class PerToken:
    name = "per_token"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], 1)


@dataclass(frozen=True)
class PerTokenBlocks:
    """Dynamic two-level blocks along the last dim (module docstring); ``rule``: ``MX`` or ``NVFP4``."""

    rule: type
    block_size: int
    name = "per_token_blocks"

    def padding(self, shape: tuple[int, ...]) -> int:
        """Zeros that complete the last dim's partial block (0 when it is a multiple of the block)."""
        return -shape[-1] % self.block_size

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], -(-shape[-1] // self.block_size))

    def scales(self, amax: torch.Tensor, fmt) -> BlockScales:
        """The block scales of blocks with largest magnitudes ``amax`` (``[..., K / B]``) by ``rule``."""
        return self.rule.scales(None, amax, fmt)


Granularity = PerTensor | PerChannel | PerBlock | LPBQ | MX | NVFP4 | PerToken | PerTokenBlocks


def full_rank_scale(scale: torch.Tensor, rank: int, axis: int | None) -> torch.Tensor:
    """A 1-D ``[C]`` scale along ``axis`` (or ``[1]``) in the full-rank layout: ``[1, .., C, .., 1]``."""
    if scale.dim() == rank or scale.numel() == 1:
        return scale.reshape([1] * rank) if scale.numel() == 1 and scale.dim() != rank else scale
    shape = [1] * rank
    shape[axis % rank] = -1
    return scale.reshape(shape)


def block_view(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int]]:
    """Shapes that make a full-rank scale broadcast against blocks of ``x`` without copying either.

    Returns ``(x_view, scale_view, block_dims)``: ``x.reshape(x_view) op scale.reshape(scale_view)``
    broadcasts each scale element over its block; ``block_dims`` are the dims of ``x_view`` that
    run inside a block (reduce over them to get one value per scale element). Dims where the
    scale has size 1 or the full size need no split. Raises ``ValueError`` when a dim of ``x`` is
    not a multiple of the scale's.
    """
    if len(scale_shape) != len(shape):
        raise ValueError(f"scale shape {tuple(scale_shape)} does not have the rank of tensor shape {tuple(shape)}")
    x_view, s_view, block_dims = [], [], []
    for d, (n, k) in enumerate(zip(shape, scale_shape)):
        if k == n or k == 1:
            x_view.append(n)
            s_view.append(k)
            if k == 1 and n != 1:
                block_dims.append(len(x_view) - 1)
        elif k and n % k == 0:
            x_view += [k, n // k]
            s_view += [k, 1]
            block_dims.append(len(x_view) - 1)
        else:
            raise ValueError(f"dim {d} of size {n} is not a multiple of the scale's size {k} there")
    return x_view, s_view, block_dims


def reduce_blocks(x: torch.Tensor, scale_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``x`` over each block of a full-rank ``scale_shape``; each of that shape."""
    x_view, s_view, dims = block_view(tuple(x.shape), tuple(scale_shape))
    v = x.reshape(x_view)
    if not dims:
        return v.reshape(scale_shape), v.reshape(scale_shape)
    return v.amin(dim=dims).reshape(scale_shape), v.amax(dim=dims).reshape(scale_shape)


def blocks_as_rows(x: torch.Tensor, scale_shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` as ``[S, E]``: one row per scale element (S), holding the E elements of its block.

    Lets any per-channel observer (``observers.py``: min/max, per-row MSE search, percentile)
    calibrate per block: observe the rows with ``axis=0`` and reshape the range to ``scale_shape``.
    """
    x_view, s_view, dims = block_view(tuple(x.shape), tuple(scale_shape))
    v = x.reshape(x_view)
    keep = [d for d in range(len(x_view)) if d not in dims]
    return v.permute(*keep, *dims).reshape(int(torch.Size(scale_shape).numel()), -1)


def scale_runs(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(outer, C, inner)`` such that a C-order ``x`` of ``shape`` viewed as ``[outer, C, inner]`` has
    element ``[o, c, i]`` under scale element ``c`` (the scale's C order), or None when the scale-indexed
    dims do not form one run. Every dim is split into ``(k, n / k)`` (``k`` the scale's size there),
    parts of size 1 dropped and neighbours of one kind merged (``fake_quant.cpp``'s ``layout_of`` does
    the same). One run: per tensor (``C = 1``), per channel on any axis, blocks along the last dim
    (``[C, K]`` / ``[C, K / B]``), blocks along axis 1 of a conv weight (``[O, I, kh, kw]`` /
    ``[O, I / B, 1, 1]``), per token (``[..., T, D]`` / ``[..., T, 1]``)."""
    numel = int(torch.Size(shape).numel())
    if int(torch.Size(scale_shape).numel()) == 1 or numel == 0:
        return 1, 1, numel
    parts: list[list] = []  # [size, indexes the scale]
    for n, k in zip(shape, scale_shape):
        for size, indexed in ((k, True), (n // k, False)):
            if size == 1:
                continue
            if parts and parts[-1][1] == indexed:
                parts[-1][0] *= size
            else:
                parts.append([size, indexed])
    runs = [i for i, (_, indexed) in enumerate(parts) if indexed]
    if len(runs) != 1:
        return None
    i = runs[0]
    outer = int(torch.Size([p[0] for p in parts[:i]]).numel())
    inner = int(torch.Size([p[0] for p in parts[i + 1:]]).numel())
    return outer, parts[i][0], inner
