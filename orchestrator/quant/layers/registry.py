"""Quantized layer types, registered per float class (AIMET's ``QuantizationMixin.implements``,
NVIDIA ModelOpt's ``QuantModuleRegistry``).

A quantized class subclasses its float class, so ``isinstance`` and ``state_dict`` keys stay
those of the original model (``fc.weight``), plus ``fc.param_quantizers.weight.*`` and
``fc.output_quantizers.0.*``. It declares which parameters it quantizes and on which channel
axis (``QUANTIZED_PARAMS``: a ``granularity.WeightAxes``, the channel axis that also names the
input axis blocks run along; a bare int is a channel axis); the simulation creates the quantizers. A new op type is one
registered class:

    @register(nn.Conv2d)
    class QuantizedConv2d(QuantizedModule, nn.Conv2d):
        QUANTIZED_PARAMS = {"weight": LINEAR}   # granularity.WeightAxes(channel=0, block=1)
        def float_forward(self, x):
            return self._conv_forward(x, self.qparam("weight"), self.bias)

Two kinds: *opaque* layers (most) run ``float_forward`` with torch-function handling off and
quantize their outputs; *transparent* layers (``TRANSPARENT = True``: multi-head attention)
quantize their parameters and let the simulation quantize the ops inside them like any
functional op (projections, scores, softmax).

Classes can also be registered by import path (``"transformers.pytorch_utils.Conv1D"``), so
an optional package is never imported to build the table.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils import _pytree as pytree

REGISTRY: dict[type, type] = {}
REGISTRY_BY_PATH: dict[str, type] = {}
LORA_ADAPTERS = "lora_adapters"  # a layer's LoRA adapters by parameter key (``quant/lora.py``)


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(float_class: type | str):
    """Class decorator: the decorated class is the quantized counterpart of ``float_class``."""

    def deco(cls: type) -> type:
        if isinstance(float_class, str):
            REGISTRY_BY_PATH[float_class] = cls
        else:
            REGISTRY[float_class] = cls
            cls.FLOAT_CLASS = float_class
        return cls

    return deco


_COMBINED: dict[type, type] = {}


def _combined(quantized: type, float_class: type) -> type:
    """A quantized class that also subclasses ``float_class`` (path-registered classes, subclasses)."""
    if float_class not in _COMBINED:
        _COMBINED[float_class] = type(f"Quantized{float_class.__name__}", (quantized, float_class),
                                      {"FLOAT_CLASS": float_class})
    return _COMBINED[float_class]


def quantized_class_for(module: nn.Module) -> type | None:
    """The quantized class for ``module``'s type: registered for that type, or for its nearest
    registered base class when the subclass keeps that base's ``forward`` (e.g. MHA's
    ``NonDynamicallyQuantizableLinear``). None when not registered: the simulation then
    quantizes the module's code op by op."""
    cls = type(module)
    if isinstance(module, QuantizedModule):
        return None
    for base in cls.__mro__:
        quantized = REGISTRY.get(base) or REGISTRY_BY_PATH.get(_path(base))
        if quantized is None:
            continue
        if base is cls and base in REGISTRY:
            return quantized
        if base is not cls and cls.forward is not base.forward:
            return None
        return _combined(quantized, cls)
    return None


class QuantizedModule(nn.Module):
    """Mixin of every quantized layer; see the module docstring.

    Class attributes: ``QUANTIZED_PARAMS`` (parameter name -> channel axis; dotted names reach
    into submodules, e.g. MHA's ``out_proj.weight``), ``TRANSPARENT``, ``PASS_THROUGH`` (the
    output is on its input's grid: no output quantizer), ``FLOAT_CLASS``.
    """

    QUANTIZED_PARAMS: ClassVar[dict[str, int]] = {}
    TRANSPARENT: ClassVar[bool] = False
    PASS_THROUGH: ClassVar[bool] = False
    FLOAT_CLASS: ClassVar[type]
    param_quantizers: nn.ModuleDict
    output_quantizers: nn.ModuleDict

    def quantized_param_names(self) -> dict[str, int]:
        """The parameters this layer instance quantizes (those that exist) -> channel axis."""
        out = {}
        for name, axis in self.QUANTIZED_PARAMS.items():
            owner_name, _, attr = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            if isinstance(getattr(owner, attr, None), nn.Parameter):
                out[name] = axis
        return out

    def quantized_param_groups(self) -> list[tuple[tuple[str, ...], int]]:
        """Parameters quantized together (one quantizer each group) and the channel axis of the
        tensor that quantizer sees: each parameter alone, unless a layer stacks some (RNNs)."""
        return [((name,), axis) for name, axis in self.quantized_param_names().items()]

    def qparam(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as the forward pass uses it: with its LoRA adapter (``quant/lora.py``) and
        through its quantizer, where it has them."""
        owner_name, _, attr = name.rpartition(".")
        value = getattr(self.get_submodule(owner_name) if owner_name else self, attr)
        key = name.replace(".", "__")
        adapters = self.__dict__["_modules"].get(LORA_ADAPTERS)  # LoRA's effective weight (quant/lora.py)
        if adapters is not None and key in adapters:
            value = adapters[key](value)
        quantizers = self.__dict__["_modules"].get("param_quantizers")
        if quantizers is not None and key in quantizers:
            return quantizers[key](value)
        return value

    def quantize_outputs(self, out: Any) -> Any:
        """``out`` with every float tensor that has an output quantizer (by leaf index) quantized."""
        quantizers = self.__dict__["_modules"].get("output_quantizers")
        if not quantizers:
            return out
        if isinstance(out, torch.Tensor):
            return quantizers["0"](out) if "0" in quantizers else out
        leaves, spec = pytree.tree_flatten(out)
        leaves = [quantizers[str(i)](t) if str(i) in quantizers else t for i, t in enumerate(leaves)]
        return pytree.tree_unflatten(leaves, spec)

    def float_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The float computation, parameters through ``qparam``; default: the float class's forward."""
        return self.FLOAT_CLASS.forward(self, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.TRANSPARENT:
            return self.float_forward(*args, **kwargs)
        with torch._C.DisableTorchFunction():
            out = self.float_forward(*args, **kwargs)
        return self.quantize_outputs(out)


def to_quantized(module: nn.Module, cls: type) -> nn.Module:
    """An instance of quantized ``cls`` sharing ``module``'s parameters, buffers and submodules."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


def to_float(module: nn.Module) -> nn.Module:
    """The float layer (same parameters, no quantizers) of a quantized layer; others unchanged."""
    if not isinstance(module, QuantizedModule):
        return module
    new = module.FLOAT_CLASS.__new__(module.FLOAT_CLASS)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    new._modules.pop("param_quantizers", None)
    new._modules.pop("output_quantizers", None)
    new._modules.pop(LORA_ADAPTERS, None)
    return new
