"""Conv/linear layers whose weight passes through a ``WeightQuantizer``.

Each quantized class subclasses its float class, so ``state_dict`` keys stay those of the
original model (``conv1.weight``, ``conv1.bias``) plus ``conv1.weight_quantizer.*``, and
``isinstance(m, nn.Conv2d)`` still holds. Only the exact float types below are swapped; a
user subclass with its own ``forward`` is left alone (its weights then stay float).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import WeightQuantizer


class QuantizedConv1d(nn.Conv1d):
    weight_quantizer: WeightQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantizedConv2d(nn.Conv2d):
    weight_quantizer: WeightQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantizedLinear(nn.Linear):
    weight_quantizer: WeightQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


QUANTIZED_CLASS = {nn.Conv1d: QuantizedConv1d, nn.Conv2d: QuantizedConv2d, nn.Linear: QuantizedLinear}
FLOAT_CLASS = {q: f for f, q in QUANTIZED_CLASS.items()}


def weight_quantizable(module: nn.Module) -> bool:
    """True for the exact layer types whose weights the simulation quantizes."""
    return type(module) in QUANTIZED_CLASS


def _rebuild(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters and buffers (own container dicts)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


def to_quantized(module: nn.Module, quantizer: WeightQuantizer) -> nn.Module:
    """The quantized counterpart of a Conv1d/Conv2d/Linear, its weight behind ``quantizer``."""
    new = _rebuild(module, QUANTIZED_CLASS[type(module)])
    new.weight_quantizer = quantizer
    return new


def to_float(module: nn.Module) -> nn.Module:
    """The plain float layer (same parameters) of a quantized layer; other modules unchanged."""
    cls = FLOAT_CLASS.get(type(module))
    if cls is None:
        return module
    new = _rebuild(module, cls)
    del new._modules["weight_quantizer"]
    return new
