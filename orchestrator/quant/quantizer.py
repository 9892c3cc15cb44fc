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

from .encoding import SCALE_CEIL, SCALE_FLOOR, Encoding, asymmetric_from_range, qmax_of, symmetric_from_range
from .errors import CalibrationError, NotCalibratedError
from . import kernels
from .fake_quant import clamp_straight_through, fake_quantize, fake_quantize_learned, round_clamp_straight_through

# A learned scale may shrink to this fraction of its calibrated value (per channel), no further.
FLOOR_RATIO = 2.0**-10


def encoding_from_range(rmin: torch.Tensor, rmax: torch.Tensor, bitwidth: int,
                        symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset ``[C]`` of the grid covering ``[rmin, rmax]`` (``[C]`` each)."""
    return (symmetric_from_range if symmetric else asymmetric_from_range)(rmin, rmax, bitwidth)


class QuantizeDequantize(nn.Module):
    """Fake quantization of one tensor; see the module docstring.

    Args:
        name: the quantizer's name in messages (the sim sets it to its qualified name).
        bitwidth: 2-16.
        symmetric: ``o = -2^(b-1)`` (weights) or an asymmetric grid holding 0 (activations).
        channels, axis: ``channels`` encodings along ``axis`` (``axis=None``: one per tensor).
        learnable: range learning (``log_scale``/``offset`` parameters).
        follow: recompute the encoding from the input on every call (weights, not learned).
        grad_scaling: scale LSQ gradients by ``1/sqrt(N * (2^b - 1))``, N the elements per
            encoding (per sample for activations).
        is_param: the quantizer quantizes a parameter (N counts every element per channel).
    """

    def __init__(self, name: str, bitwidth: int, symmetric: bool, channels: int = 1, axis: int | None = None,
                 learnable: bool = False, follow: bool = False, grad_scaling: bool = True,
                 is_param: bool = False) -> None:
        super().__init__()
        if learnable and follow:
            raise ValueError("a quantizer is either learned or follows its input, not both")
        self.name = name
        self.bitwidth = bitwidth
        self.qmax = qmax_of(bitwidth)
        self.symmetric = symmetric
        self.axis = axis
        self.channels = channels if axis is not None else 1
        self.learnable = learnable
        self.follow = follow
        self.grad_scaling = grad_scaling
        self.is_param = is_param
        self.enabled = True
        self.observer = None
        n = self.channels
        sym_offset = torch.full((n,), -float(1 << (bitwidth - 1))) if symmetric else torch.zeros(n)
        if learnable:
            self.log_scale = nn.Parameter(torch.zeros(n))
            self.register_buffer("log_floor", torch.full((n,), -math.inf))
            if symmetric:
                self.register_buffer("offset", sym_offset)
            else:
                self.offset = nn.Parameter(torch.zeros(n))
        elif follow:
            self.register_buffer("ratio", torch.ones(n))
            self.register_buffer("offset", sym_offset, persistent=False)
        else:
            self.register_buffer("scale", torch.zeros(n))
            self.register_buffer("offset", sym_offset)
        self.calibrated = follow
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
        if self.follow:
            scale, offset = self._follow_encoding(x)
            return fake_quantize(x, scale, offset, self.qmax, self.axis)
        if not self.calibrated:
            raise NotCalibratedError(
                f"quantizer {self.name!r} has no encoding yet: call sim.compute_encodings(...) "
                "or sim.load_encodings(...) before running sim.model"
            )
        if self.learnable:
            return fake_quantize_learned(x, self.log_scale, self.log_floor, self.offset, self.qmax, self.axis,
                                         self._grad_factor(x), not self.symmetric)
        return fake_quantize(x, self.scale, self.offset, self.qmax, self.axis)

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
        if self.axis is None:
            lo, hi = (v.reshape(1) for v in torch.aminmax(x))
        elif self.axis % x.dim() == 0:
            lo, hi = torch.aminmax(x.reshape(x.shape[0], -1), dim=1)
        else:
            dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        scale, offset = encoding_from_range(lo.float(), hi.float(), self.bitwidth, self.symmetric)
        return scale * self.ratio, offset

    @torch.no_grad()
    def _refresh(self) -> None:
        """After an encoding was set (``set_encoding``, ``load_state_dict``): make the stored
        encoding valid (scale in range, offset an integer on the grid) and update ``calibrated``."""
        if self.learnable:
            self.calibrated = bool(torch.isfinite(self.log_floor).all())
            return
        if self.follow:
            return
        self.calibrated = bool(self.scale.gt(0).all())
        if self.calibrated:
            self.scale.clamp_(SCALE_FLOOR, SCALE_CEIL)
            self.offset.round_().clamp_(-self.qmax, 0)

    # ------------------------------------------------------------------ encodings
    @torch.no_grad()
    def set_encoding(self, scale: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        """Set scale ``[C]`` (> 0) and integer offset ``[C]``; marks the quantizer calibrated.

        Learned: the floor becomes ``FLOOR_RATIO`` times this scale. Follow: sets nothing
        (the encoding follows the tensor); use ``set_ratio``.
        """
        if self.follow:
            raise ValueError(f"quantizer {self.name!r} follows its tensor; its encoding cannot be set")
        scale = scale.reshape(self.channels).float().clamp(SCALE_FLOOR, SCALE_CEIL)
        if self.learnable:
            self.log_scale.copy_(scale.log())
            self.log_floor.copy_((scale * FLOOR_RATIO).log())  # relative, even for scales at SCALE_FLOOR
        else:
            self.scale.copy_(scale)
        if offset is not None and not self.symmetric:
            self.offset.copy_(offset.reshape(self.channels).to(self.offset))
        self._refresh()

    @torch.no_grad()
    def set_range(self, rmin: torch.Tensor, rmax: torch.Tensor) -> None:
        """Set the encoding of the grid covering ``[rmin, rmax]`` (``[C]`` each)."""
        scale, offset = encoding_from_range(rmin.reshape(-1).float(), rmax.reshape(-1).float(), self.bitwidth,
                                            self.symmetric)
        self.set_encoding(scale, offset)

    @torch.no_grad()
    def encoding(self, x: torch.Tensor | None = None) -> Encoding:
        """The encoding the forward pass uses now (``x``: the tensor, for a follow quantizer)."""
        if self.follow:
            if x is None:
                raise ValueError(f"quantizer {self.name!r} follows its tensor: pass it to encoding(x)")
            scale, offset = self._follow_encoding(x)
        elif self.learnable:
            scale, offset = self._learned_encoding()
        else:
            scale, offset = self.scale.clamp(SCALE_FLOOR, SCALE_CEIL), self.offset.round().clamp(-self.qmax, 0)
        return Encoding(self.bitwidth, self.symmetric, scale.detach().float().cpu().clone(),
                        offset.detach().float().cpu().clone(), self.axis)

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

    @torch.no_grad()
    def calibrate_on(self, tensor: torch.Tensor, observer) -> None:
        """Calibrate from one tensor (a weight) with ``observer``.

        Fixed/learned: the observer's range becomes the encoding. Follow: the observer's scale
        as a fraction of the tensor's min-max scale becomes the clip ``ratio`` per channel.
        """
        observer.observe(tensor)
        rmin, rmax = observer.range(self.bitwidth, self.symmetric)
        if not self.follow:
            self.set_range(rmin, rmax)
            return
        full, _ = encoding_from_range(*self._minmax(tensor), self.bitwidth, self.symmetric)
        chosen, _ = encoding_from_range(rmin.float(), rmax.float(), self.bitwidth, self.symmetric)
        self.ratio.copy_((chosen / full).clamp(0.0, 1.0).reshape(self.channels).to(self.ratio))

    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of ``x`` per channel (``[C]``, float32, CPU)."""
        x = x.detach().float()
        if self.axis is None:
            lo, hi = torch.aminmax(x)
            return lo.reshape(1).cpu(), hi.reshape(1).cpu()
        lo, hi = torch.aminmax(x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1), dim=1)
        return lo.cpu(), hi.cpu()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def extra_repr(self) -> str:
        kind = "learned" if self.learnable else ("follows its tensor" if self.follow else "fixed")
        where = "per tensor" if self.axis is None else f"{self.channels} channels on axis {self.axis}"
        return (f"{self.name!r}, bw={self.bitwidth}, {'symmetric' if self.symmetric else 'asymmetric'}, {where}, "
                f"{kind}, enabled={self.enabled}")
