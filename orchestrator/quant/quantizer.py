"""``QuantizeDequantize``: the one fake-quant node of a simulation, for weights and activations.

A quantizer holds encodings of shape ``[C]`` along ``axis`` (``C = 1``, ``axis = None`` per
tensor), a bit width and a symmetry, and gets its range during calibration from an injected
observer (``observers.OBSERVERS``). It behaves in one of three ways:

- **fixed** (activations without range learning): ``scale``/``offset`` buffers, set by
  calibration or ``set_encoding`` and unchanged by training.
- **follow** (weights without learned encodings): the encoding is recomputed from the tensor
  on every call: its min-max range per channel times the per-channel clipping ``ratio`` that
  calibration chose (1 for ``min_max``; below 1 where ``sqnr``/``percentile`` clip), so the
  encoding keeps following the weights as they train. No gradient flows into the encoding.
- **learned** (range learning): ``log_scale`` and (asymmetric) ``offset`` are ``nn.Parameter``s
  trained by LSQ/LSQ+ gradients. The scale is ``exp(log_scale)``, so no optimizer step can make
  it non-positive, and an optimizer's step moves it by a *relative* amount (Adam at lr 1e-3:
  about 0.1% per step). It is floored at ``FLOOR_RATIO`` times its calibrated value (a floor
  relative to the tensor, with a straight-through gradient); ``floor_hit()`` tells when a
  channel reached it, and ``QuantizationSimModel.watch_encodings`` warns naming the quantizer.

States: *uncalibrated* (forward raises ``NotCalibratedError``), *observing* (records statistics,
returns the input unchanged), *quantizing*. ``enabled = False`` makes it an identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .encoding import SCALE_CEIL, SCALE_FLOOR, Encoding, asymmetric_from_range, symmetric_from_range
from .errors import CalibrationError, NotCalibratedError
from . import kernels
from .fake_quant import (clamp_straight_through, fake_quantize_float_learned, fake_quantize_format,
                         fake_quantize_learned, round_clamp_straight_through)
from .formats import Format, IntFormat
from .block_scales import BlockScales
from .granularity import LPBQ, TWO_LEVEL, Granularity, PerBlock, PerChannel, PerTensor, PerToken, PerTokenBlocks, \
    blocks_as_rows, full_rank_scale, reduce_blocks

# A learned scale may shrink to this fraction of its calibrated value (per channel), no further.
FLOOR_RATIO = 2.0**-10


def encoding_from_range(rmin: torch.Tensor, rmax: torch.Tensor, bitwidth: int,
                        symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset ``[C]`` of the grid covering ``[rmin, rmax]`` (``[C]`` each)."""
    return (symmetric_from_range if symmetric else asymmetric_from_range)(rmin, rmax, bitwidth)


def format_encoding_from_range(rmin: torch.Tensor, rmax: torch.Tensor,
                               fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (shapes of ``rmin``) of format ``fmt`` covering ``[rmin, rmax]``.

    Integer: ``encoding_from_range``. Scaled float (FP8/FP4): ``s = max(|min|, |max|) / M`` (the
    largest magnitude lands on the format's largest value ``M``; at least SCALE_FLOOR), offset 0.
    Unscaled casts: ``s = 1``."""
    if isinstance(fmt, IntFormat):
        return encoding_from_range(rmin, rmax, fmt.bitwidth, fmt.symmetric)
    if not fmt.scaled:
        return torch.ones_like(rmin, dtype=torch.float32), torch.zeros_like(rmin, dtype=torch.float32)
    amax = torch.maximum(rmin.float().abs(), rmax.float().abs())
    return (amax / fmt.max).clamp_(min=SCALE_FLOOR), torch.zeros_like(amax)


class QuantizeDequantize(nn.Module):
    """Fake quantization of one tensor; see the module docstring.

    Args:
        name: the quantizer's name in messages (the sim sets it to its qualified name).
        bitwidth: 2-16 (integer formats; a float format has its own).
        symmetric: ``o = -2^(b-1)`` (weights) or an asymmetric grid holding 0 (activations).
        channels, axis: ``channels`` encodings along ``axis`` (``axis=None``: one per tensor).
        learnable: range learning (``log_scale``/``offset`` parameters).
        follow: recompute the encoding from the input on every call (weights, not learned).
        grad_scaling: scale LSQ gradients by ``1/sqrt(N * (2^b - 1))``, N the elements per
            encoding (per sample for activations).
        is_param: the quantizer quantizes a parameter (N counts every element per channel).
        fmt: a ``formats`` format (default: ``IntFormat(bitwidth, symmetric)``); float formats
            are symmetric (offset 0).
        granularity: ``PerBlock`` (with ``shape``, the tensor's shape: scales ``[.., C, .., K/B, ..]``),
            a two-level block granularity (``LPBQ``, ``MX``, ``NVFP4``: weights; the block scales
            follow the weights by ``block_scales.py``'s rules; learned: LPBQ only, its per-channel
            float scale ``log_scale`` ``[.., C, .., 1, ..]`` by LSQ under the integer block scales
            ``block_int`` fixed at calibration), ``PerToken`` (dynamic: the encoding is computed from
            each token at run time, never calibrated or learned) or ``PerTokenBlocks`` (dynamic MX /
            NVFP4 activations: each block of the last dim scaled from its own values at run time).
            Default: per channel when ``axis`` is given, else per tensor.

    Every integer quantizer runs the fused op (``fake_quant.py``) with its encoding in the reference
    layout (per tensor, per channel on any axis, per block on any axes, per token; fixed, following
    or learned per channel), except learned blocks (LPBQ included), which stay on the reference's
    learned ops: the fused learned op's ``exp`` is traced by torch.compile, whose ``exp`` can differ
    from eager's in the last bit. Scaled float formats run the fused float ops on CPU
    (``fake_quant.fake_quantize_format``, ``fake_quantize_float_learned``: the learned scale's ``exp``
    inside the op, eager under compile too); learned float blocks the reference's learned op.
    """

    def __init__(self, name: str, bitwidth: int, symmetric: bool, channels: int = 1, axis: int | None = None,
                 learnable: bool = False, follow: bool = False, grad_scaling: bool = True,
                 is_param: bool = False, fmt: Format | None = None, granularity: Granularity | None = None,
                 shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if learnable and follow:
            raise ValueError("a quantizer is either learned or follows its input, not both")
        if isinstance(granularity, TWO_LEVEL) and not isinstance(granularity, LPBQ) and not follow:
            raise ValueError(f"quantizer {name!r}: {granularity.name} block scales follow the tensor by the format's "
                             "rule; allowed: follow=True")
        fmt = fmt if fmt is not None else IntFormat(bitwidth, symmetric)
        if granularity is None:
            granularity = PerChannel(axis) if axis is not None else PerTensor()
        self.name = name
        self.format = fmt
        self.granularity = granularity
        self.bitwidth = fmt.bitwidth
        self.symmetric = fmt.symmetric
        # The op's integer range; LSQ's Qp for float formats is their largest value.
        self.qmax = fmt.qmax if isinstance(fmt, IntFormat) else int(fmt.max)
        self.dynamic = isinstance(granularity, (PerToken, PerTokenBlocks))
        self.cast_only = fmt.is_float and not fmt.scaled
        if self.dynamic or self.cast_only:
            learnable, follow = False, False
        if isinstance(granularity, PerBlock):
            if shape is None:
                raise ValueError(f"quantizer {name!r}: per-block quantization needs the tensor's shape")
            self.scale_shape = tuple(granularity.scale_shape(tuple(shape)))
            axis = granularity.axis
        elif isinstance(granularity, PerChannel):
            axis = granularity.axis
            self.scale_shape = (channels,)
        else:
            axis = None
            self.scale_shape = (1,)
        self.axis = axis
        self.channels = int(torch.Size(self.scale_shape).numel())
        # Learned on the reference's learned op: blocks and unscaled casts (class docstring).
        self.learned_on_reference = isinstance(granularity, PerBlock) or (fmt.is_float and not fmt.scaled)
        self.learnable = learnable
        self.follow = follow
        self.grad_scaling = grad_scaling
        self.is_param = is_param
        self.enabled = True
        self.observer = None
        n = self.scale_shape
        sym_offset = torch.full(n, -float(1 << (fmt.bitwidth - 1))) if isinstance(fmt, IntFormat) and fmt.symmetric \
            else torch.zeros(n)
        self.lpbq_learned = learnable and isinstance(granularity, LPBQ)
        if self.lpbq_learned:  # the per-channel float scale is learned; the integer block scales stay
            channel = list(n)
            channel[granularity.block_axis] = 1
            self.register_buffer("block_int", torch.ones(n))
            n = tuple(channel)
        if learnable:
            self.log_scale = nn.Parameter(torch.zeros(n))
            self.register_buffer("log_floor", torch.full(n, -math.inf))
            if self.symmetric:
                self.register_buffer("offset", sym_offset)
            else:
                self.offset = nn.Parameter(torch.zeros(n))
        elif follow:
            self.register_buffer("ratio", torch.ones(n))
            self.register_buffer("offset", sym_offset, persistent=False)
        else:
            self.register_buffer("scale", torch.ones(n) if self.cast_only else torch.zeros(n))
            self.register_buffer("offset", sym_offset)
        self.calibrated = follow or self.dynamic or self.cast_only
        kernels.backend()  # define the fused op before the first forward (builds the kernel once per machine)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Off for the quantizer's own arithmetic: the simulation's op counting never sees it.
        with torch._C.DisableTorchFunction():
            return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if not self.enabled:
            return x
        if self.dynamic:
            if isinstance(self.granularity, PerTokenBlocks):
                pad = self.granularity.padding(tuple(x.shape))
                xp = torch.nn.functional.pad(x, (0, pad)) if pad else x  # a partial last block, zero-padded
                scale, offset = self._dynamic_encoding(xp)
                out = fake_quantize_format(xp, scale, offset, self.format)
                return out[..., :x.shape[-1]] if pad else out
            scale, offset = self._dynamic_encoding(x)
            return self._run(x, scale, offset)
        if self.follow:
            scale, offset = self._follow_encoding(x)
            return self._run(x, self._full(scale, x), self._full(offset, x))
        if not self.calibrated:
            raise NotCalibratedError(
                f"quantizer {self.name!r} has no encoding yet: call sim.compute_encodings(...) "
                "or sim.load_encodings(...) before running sim.model"
            )
        if self.lpbq_learned:  # s = s_c * i: the product a consumer of the file computes
            return torch.ops.qat.quantize_dequantize_lpbq_learned(x, self.log_scale, self.log_floor, self.block_int,
                                                                  self.offset, self.format.name, self.format.qmax,
                                                                  self._grad_factor(x))
        if self.learnable:
            if self.learned_on_reference:
                return torch.ops.qat.quantize_dequantize_general_learned(
                    x, self._full(self.log_scale, x), self._full(self.log_floor, x), self._full(self.offset, x),
                    self.format.name, self.format.qmax, self._grad_factor(x), not self.symmetric)
            if self.format.is_float:
                return fake_quantize_float_learned(x, self._full(self.log_scale, x), self._full(self.log_floor, x),
                                                   self.format, self._grad_factor(x))
            return fake_quantize_learned(x, self._full(self.log_scale, x), self._full(self.log_floor, x),
                                         self._full(self.offset, x), self.qmax, self._grad_factor(x),
                                         not self.symmetric)
        return self._run(x, self._full(self.scale, x), self._full(self.offset, x))

    def _run(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Fixed or computed encodings in the reference layout (the fused ops: ``fake_quantize_format``)."""
        return fake_quantize_format(x, scale, offset, self.format)

    def _full(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A stored encoding tensor in the reference op's layout (full rank, or one element)."""
        return full_rank_scale(t, x.dim(), self.axis) if isinstance(self.granularity, PerChannel) else t

    @torch.no_grad()
    def _dynamic_encoding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: the encoding of each token's own min-max range (the last dim reduced), ``[..., 1]``.
        (``reduce_blocks``' amin/amax: ``torch.aminmax`` over a last dim is 15-25x slower on CPU.)
        Per token blocks (``x``'s last dim a multiple of the block): each block's scale by the format's
        rule from its largest magnitude, ``[..., K / B]`` (offset: the element format's symmetric one)."""
        x = x.detach().float()
        g = self.granularity
        if isinstance(g, PerTokenBlocks):
            lo, hi = reduce_blocks(x, g.scale_shape(tuple(x.shape)))
            scale = g.scales(torch.maximum(lo.abs(), hi.abs()), self.format).scale
            fill = -float(1 << (self.bitwidth - 1)) if isinstance(self.format, IntFormat) else 0.0
            return scale, torch.full_like(scale, fill)
        lo, hi = reduce_blocks(x, (*x.shape[:-1], 1))
        return format_encoding_from_range(lo, hi, self.format)

    def _grad_factor(self, x: torch.Tensor) -> float:
        if not self.grad_scaling:
            return 1.0
        per_encoding = x.numel() // self.channels
        if not self.is_param and x.dim() > 0 and x.shape[0] > 0:
            per_encoding //= x.shape[0]
        return 1.0 / math.sqrt(max(per_encoding, 1) * self.qmax)

    def _learned_encoding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (``exp(log_scale)`` floored, straight-through) and offset (rounded, clamped)."""
        scale = clamp_straight_through(self.log_scale, self.log_floor, math.log(SCALE_CEIL)).exp()
        if self.symmetric:
            return scale, self.offset
        return scale, round_clamp_straight_through(self.offset, -float(self.qmax), 0.0)

    @torch.no_grad()
    def _follow_encoding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max encoding of ``x`` per channel, the scale times the calibrated clip ``ratio``."""
        x = x.detach()
        if isinstance(self.granularity, PerBlock):
            lo, hi = reduce_blocks(x, self.scale_shape)
            scale, offset = format_encoding_from_range(lo.float(), hi.float(), self.format)
            if isinstance(self.granularity, TWO_LEVEL):
                return self._two_level(scale * self.ratio, lo, hi).scale, offset
            return scale * self.ratio, offset
        if self.axis is None:
            lo, hi = (v.reshape(1) for v in torch.aminmax(x))
        elif self.axis % x.dim() == 0:
            lo, hi = (v.reshape(-1) for v in reduce_blocks(x.reshape(x.shape[0], -1), (x.shape[0], 1)))
        else:
            dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        scale, offset = format_encoding_from_range(lo.float(), hi.float(), self.format)
        return scale * self.ratio, offset

    def _two_level(self, raw: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> BlockScales:
        """The two-level block scales of blocks with plain scales ``raw`` and range ``[lo, hi]``."""
        amax = torch.maximum(lo.float().abs(), hi.float().abs())
        return self.granularity.scales(raw, amax, self.format)

    def _parts(self, x: torch.Tensor | None) -> BlockScales | None:
        """The stored parts of a two-level encoding now (``x``: the tensor, for a follow quantizer)."""
        if not isinstance(self.granularity, TWO_LEVEL):
            return None
        if self.lpbq_learned:
            scale_c, _ = self._learned_encoding()
            return BlockScales(scale_c * self.block_int, self.block_int.clone(), scale_c)
        lo, hi = reduce_blocks(x.detach(), self.scale_shape)
        raw, _ = format_encoding_from_range(lo.float(), hi.float(), self.format)
        return self._two_level(raw * self.ratio, lo, hi)

    @torch.no_grad()
    def _refresh(self) -> None:
        """After an encoding was set (``set_encoding``, ``load_state_dict``): make the stored
        encoding valid (scale in range, offset an integer on the grid) and update ``calibrated``."""
        if self.learnable:
            self.calibrated = bool(torch.isfinite(self.log_floor).all())
            return
        if self.follow or self.dynamic:
            return
        self.calibrated = bool(self.scale.gt(0).all())
        if self.calibrated:
            self.scale.clamp_(SCALE_FLOOR, SCALE_CEIL)
            if not self.format.is_float:
                self.offset.round_().clamp_(-self.qmax, 0)

    # ------------------------------------------------------------------ encodings
    @torch.no_grad()
    def set_encoding(self, scale: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        """Set scale ``[C]`` (> 0) and integer offset ``[C]``; marks the quantizer calibrated.

        Learned: the floor becomes ``FLOOR_RATIO`` times this scale. Follow: sets nothing
        (the encoding follows the tensor); use ``set_ratio``.
        """
        if self.follow or self.dynamic or self.cast_only:
            raise ValueError(f"quantizer {self.name!r} computes its own encoding; it cannot be set")
        scale = scale.reshape(self.scale_shape).float().clamp(SCALE_FLOOR, SCALE_CEIL)
        if self.lpbq_learned:  # compress: the integers stay, the per-channel scale is learned from here
            parts = self.granularity.scales(scale, scale, self.format)
            self.block_int.copy_(parts.inner)
            scale = parts.outer
        if self.learnable:
            self.log_scale.copy_(scale.log())
            self.log_floor.copy_((scale * FLOOR_RATIO).log())  # relative, even for scales at SCALE_FLOOR
        else:
            self.scale.copy_(scale)
        if offset is not None and not self.symmetric:
            self.offset.copy_(offset.reshape(self.scale_shape).to(self.offset))
        self._refresh()

    @torch.no_grad()
    def set_range(self, rmin: torch.Tensor, rmax: torch.Tensor) -> None:
        """Set the encoding of the grid covering ``[rmin, rmax]`` (``[C]`` each, or the scale's shape)."""
        scale, offset = format_encoding_from_range(rmin.reshape(-1).float(), rmax.reshape(-1).float(), self.format)
        self.set_encoding(scale, offset)

    @torch.no_grad()
    def encoding(self, x: torch.Tensor | None = None) -> Encoding:
        """The encoding the forward pass uses now (``x``: the tensor, for a follow quantizer)."""
        if self.dynamic:
            scale, offset = torch.ones(1), torch.zeros(1)  # computed per token at run time; nothing stored
        elif self.follow:
            if x is None:
                raise ValueError(f"quantizer {self.name!r} follows its tensor: pass it to encoding(x)")
            scale, offset = self._follow_encoding(x)
        elif self.lpbq_learned:
            scale, offset = self._learned_encoding()
            scale = scale * self.block_int
        elif self.learnable:
            scale, offset = self._learned_encoding()
        elif self.format.is_float:
            scale, offset = self.scale.clamp(SCALE_FLOOR, SCALE_CEIL), self.offset
        else:
            scale, offset = self.scale.clamp(SCALE_FLOOR, SCALE_CEIL), self.offset.round().clamp(-self.qmax, 0)
        g = self.granularity
        block_axis = block_size = None
        if isinstance(g, PerBlock):  # the block size used (a block wider than the dim is the whole dim)
            block_axis = g.block_axis
            block_size = x.shape[block_axis] // self.scale_shape[block_axis] if x is not None else g.block_size
        elif isinstance(g, PerTokenBlocks):  # blocks of the last dim, scales computed at run time
            block_axis, block_size = -1, g.block_size
        parts = self._parts(x)
        two_level = {"scheme": g.rule.name} if isinstance(g, PerTokenBlocks) else {} if parts is None else dict(
            scheme=g.name, inner=parts.inner.detach().float().cpu().clone(),
            outer=None if parts.outer is None else parts.outer.detach().float().cpu().clone(),
            scale_bitwidth=getattr(g, "scale_bitwidth", None))
        return Encoding(self.bitwidth, self.symmetric, scale.detach().float().cpu().clone(),
                        offset.detach().float().cpu().clone(), self.axis, dtype=self.format.name,
                        block_axis=block_axis, block_size=block_size, dynamic=self.dynamic, **two_level)

    @torch.no_grad()
    def floor_hit(self) -> torch.Tensor:
        """Learned: a bool tensor, True where a channel's scale sits at its floor (no host sync).
        A sharded ``log_scale`` (FSDP2's DTensor) is gathered whole: every rank must call this."""
        log_scale = self.log_scale
        if hasattr(log_scale, "full_tensor"):
            log_scale = log_scale.full_tensor()
        return (log_scale <= self.log_floor).any()

    # ------------------------------------------------------------------ calibration
    def start_observing(self, observer) -> None:
        self.observer = observer

    def stop_observing(self) -> None:
        """Turn the statistics observed since ``start_observing`` into this quantizer's encoding."""
        observer, self.observer = self.observer, None
        if observer is None or not observer.observed:
            raise CalibrationError(
                f"quantizer {self.name!r} saw no data during compute_encodings: the calibration "
                "callback must run sim.model forward on representative inputs"
            )
        self.set_range(*observer.range(self.bitwidth, self.symmetric))

    @property
    def needs_calibration(self) -> bool:
        """False for quantizers that compute their own encoding (dynamic per token, fp16/bf16 casts)."""
        return not (self.dynamic or self.cast_only)

    @property
    def observer_axis(self) -> int | None:
        """The axis an observer of this quantizer's tensor reduces per: per block, the rows of
        ``blocks_as_rows`` (axis 0); else the channel axis."""
        return 0 if isinstance(self.granularity, PerBlock) else self.axis

    @torch.no_grad()
    def calibrate_on(self, tensor: torch.Tensor, observer) -> None:
        """Calibrate from one tensor (a weight) with ``observer`` (made for ``observer_axis``).

        Fixed/learned: the observer's range becomes the encoding. Follow: the observer's scale
        as a fraction of the tensor's min-max scale becomes the clip ``ratio`` per channel (per
        block: the observer sees one row per block).
        """
        if not self.needs_calibration:
            return
        if isinstance(self.granularity, PerBlock):
            tensor = blocks_as_rows(tensor.detach(), self.scale_shape)
        observer.observe(tensor)
        rmin, rmax = observer.range(self.bitwidth, self.symmetric)
        if not self.follow:
            self.set_range(rmin, rmax)
            return
        full, _ = format_encoding_from_range(*self._minmax(tensor), self.format)
        chosen, _ = format_encoding_from_range(rmin.float(), rmax.float(), self.format)
        self.ratio.copy_((chosen / full).clamp(0.0, 1.0).reshape(self.scale_shape).to(self.ratio))

    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of ``x`` per channel on ``observer_axis`` (``[C]``, float32, CPU)."""
        x = x.detach().float()
        axis = self.observer_axis
        if axis is None:
            lo, hi = torch.aminmax(x)
            return lo.reshape(1).cpu(), hi.reshape(1).cpu()
        lo, hi = torch.aminmax(x.movedim(axis, 0).reshape(x.shape[axis], -1), dim=1)
        return lo.cpu(), hi.cpu()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def describe_granularity(self) -> str:
        """``per tensor``, ``64 ch, axis 0``, ``blocks [64, 2] (axis 0, block axis 1)``, ``per token``."""
        g = self.granularity
        if isinstance(g, PerBlock):
            kind = {"per_block": "blocks"}.get(g.name, f"{g.name.upper()} blocks")
            return f"{kind} {list(self.scale_shape)} (axis {g.axis}, block axis {g.block_axis})"
        if isinstance(g, PerToken):
            return "per token (dynamic)"
        if isinstance(g, PerTokenBlocks):
            return f"{g.rule.name.upper()} blocks of {g.block_size} along the last dim (dynamic)"
        return "per tensor" if self.axis is None else f"{self.channels} ch, axis {self.axis}"

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "learned" if self.learnable else (
            "follows its tensor" if self.follow else "fixed")
        fmt = f"bw={self.bitwidth}, {'symmetric' if self.symmetric else 'asymmetric'}" \
            if isinstance(self.format, IntFormat) else self.format.name
        return f"{self.name!r}, {fmt}, {self.describe_granularity()}, {kind}, enabled={self.enabled}"
