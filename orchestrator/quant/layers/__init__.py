"""Quantized layer types, one registered class per float class (``registry.register``)."""

from . import attention, elementwise, parametric, recurrent  # noqa: F401  (register the built-in classes)
from .registry import REGISTRY, QuantizedModule, quantized_class_for, register, to_float, to_quantized

__all__ = ["REGISTRY", "QuantizedModule", "quantized_class_for", "register", "to_float", "to_quantized"]
