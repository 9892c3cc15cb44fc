"""Quantizer modules: the fake-quant nodes that sit in ``sim.model``.

``ActivationQuantizer`` quantizes one activation tensor per tensor, asymmetric. Its
``scale``/``offset`` (shape ``[1]``) are buffers when static and ``nn.Parameter``s with range
learning; either way they are in ``state_dict`` under the same keys, so a checkpoint restores
the exact encoding.

``WeightQuantizer`` quantizes a conv/linear weight, symmetric, per output channel (axis 0) or
per tensor. Static: the encoding is recomputed from the weight on every forward pass. Learned:
``scale`` (shape ``[C]``) is an ``nn.Parameter`` initialised from the weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .encoding import SCALE_CEIL, SCALE_FLOOR, Encoding, asymmetric_from_range, qmax_of, symmetric_offset
from .errors import NotCalibratedError
from .fake_quant import learned_quantize_dequantize, quantize_dequantize, weight_scale


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric fake quantization of an activation.

    States: *uncalibrated* (forward raises ``NotCalibratedError``), *observing* (during
    ``compute_encodings``: records statistics, returns the input unchanged), *quantizing*.
    ``enabled = False`` makes it an identity.
    """

    def __init__(self, name: str, bitwidth: int, learnable: bool, grad_scaling: bool = True) -> None:
        super().__init__()
        self.name = name
        self.bitwidth = bitwidth
        self.qmax = qmax_of(bitwidth)
        self.learnable = learnable
        self.grad_scaling = grad_scaling
        self.enabled = True
        self.observer = None
        self.calibrated = False
        if learnable:
            self.scale = nn.Parameter(torch.zeros(1))
            self.offset = nn.Parameter(torch.zeros(1))
        else:
            self.register_buffer("scale", torch.zeros(1))
            self.register_buffer("offset", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if not self.enabled:
            return x
        if not self.calibrated:
            raise NotCalibratedError(
                f"quantizer {self.name!r} has no encoding yet: call sim.compute_encodings(...) "
                "or sim.load_encodings(...) before running sim.model"
            )
        if self.learnable:
            grad_factor = 1.0
            if self.grad_scaling:
                per_sample = x.numel() // x.shape[0] if x.dim() > 0 and x.shape[0] > 0 else x.numel()
                grad_factor = 1.0 / math.sqrt(max(per_sample, 1) * self.qmax)
            return learned_quantize_dequantize(x, self.scale, self.offset, self.qmax, grad_factor)
        return quantize_dequantize(x, *self._fixed)

    @torch.no_grad()
    def set_encoding(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Set scale ``[1]`` and integer offset ``[1]`` (in ``[-(2^b-1), 0]``); marks calibrated."""
        self.scale.copy_(scale.reshape(1).to(self.scale))
        self.offset.copy_(offset.reshape(1).to(self.offset))
        self._refresh()

    @torch.no_grad()
    def set_range(self, rmin: float, rmax: float) -> None:
        """Set the encoding of the asymmetric grid covering ``[rmin, rmax]`` (widened to hold 0)."""
        scale, offset = asymmetric_from_range(torch.tensor([rmin]), torch.tensor([rmax]), self.bitwidth)
        self.set_encoding(scale, offset)

    def _refresh(self) -> None:
        """Re-read the encoding after it was set (``set_encoding``, ``load_state_dict``)."""
        self.calibrated = bool(self.scale.detach().gt(0).all())
        if not self.learnable and self.calibrated:
            offset = float(self.offset.detach().round().clamp(-self.qmax, 0))
            self._fixed = (float(self.scale.detach().clamp(SCALE_FLOOR, SCALE_CEIL)), offset, offset + self.qmax)

    def encoding(self) -> Encoding:
        """The encoding the forward pass uses now (scale floored, offset rounded and clamped)."""
        scale = self.scale.detach().clamp(SCALE_FLOOR, SCALE_CEIL).float().cpu().clone()
        offset = self.offset.detach().round().clamp(-self.qmax, 0).float().cpu().clone()
        return Encoding(self.bitwidth, False, scale, offset)

    def start_observing(self, observer) -> None:
        self.observer = observer

    def stop_observing(self) -> None:
        """Turn the observed statistics into this quantizer's encoding."""
        observer, self.observer = self.observer, None
        if observer is None or not observer.observed:
            raise NotCalibratedError(
                f"quantizer {self.name!r} saw no data during compute_encodings: the calibration "
                "callback must run sim.model forward on representative inputs"
            )
        self.set_range(*observer.range(self.bitwidth))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def extra_repr(self) -> str:
        mode = "learned" if self.learnable else "static"
        return f"bw={self.bitwidth}, asymmetric, per-tensor, {mode}, enabled={self.enabled}"


class WeightQuantizer(nn.Module):
    """Symmetric fake quantization of a weight whose output channels are on axis 0."""

    def __init__(self, bitwidth: int, channels: int, per_channel: bool, learnable: bool,
                 grad_scaling: bool = True) -> None:
        super().__init__()
        self.bitwidth = bitwidth
        self.qmax = qmax_of(bitwidth)
        self.per_channel = per_channel
        self.learnable = learnable
        self.grad_scaling = grad_scaling
        self.enabled = True
        n = channels if per_channel else 1
        self.register_buffer("_offset", torch.full((n,), float(symmetric_offset(bitwidth))), persistent=False)
        if learnable:
            self.scale = nn.Parameter(torch.zeros(n))
        self.calibrated = not learnable

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.learnable:
            if not self.calibrated:
                raise NotCalibratedError(
                    "a learned weight quantizer has no encoding yet: call sim.compute_encodings(...)"
                )
            grad_factor = 1.0
            if self.grad_scaling:
                per_channel_elems = w.numel() // self.scale.numel()
                grad_factor = 1.0 / math.sqrt(per_channel_elems * self.qmax)
            return learned_quantize_dequantize(w, self.scale, self._offset, self.qmax, grad_factor, self.per_channel)
        scale = weight_scale(w, self.bitwidth, self.per_channel)
        if self.per_channel:
            scale = scale.reshape((-1,) + (1,) * (w.dim() - 1))
        lo = float(symmetric_offset(self.bitwidth))
        return quantize_dequantize(w, scale, lo, lo + self.qmax)

    @torch.no_grad()
    def init_from_weight(self, w: torch.Tensor) -> None:
        """Learned mode: initialise ``scale`` from the weight's symmetric min-max range."""
        if self.learnable:
            self.scale.copy_(weight_scale(w, self.bitwidth, self.per_channel))
            self.calibrated = True

    @torch.no_grad()
    def set_scale(self, scale: torch.Tensor) -> None:
        """Learned mode: set ``scale`` (shape ``[C]`` or ``[1]``)."""
        self.scale.copy_(scale.reshape(self.scale.shape).to(self.scale))
        self.calibrated = bool(self.scale.gt(0).all())

    def encoding(self, w: torch.Tensor) -> Encoding:
        """The encoding the forward pass uses for weight ``w`` now."""
        if self.learnable:
            scale = self.scale.detach().clamp(SCALE_FLOOR, SCALE_CEIL)
        else:
            scale = weight_scale(w.detach(), self.bitwidth, self.per_channel)
        scale = scale.float().cpu().clone()
        offset = torch.full_like(scale, float(symmetric_offset(self.bitwidth)))
        return Encoding(self.bitwidth, True, scale, offset)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.learnable:
            self.calibrated = bool(self.scale.detach().gt(0).all())

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.per_channel else "per-tensor"
        mode = "learned" if self.learnable else "follows weights"
        return f"bw={self.bitwidth}, symmetric, {granularity}, {mode}, enabled={self.enabled}"

