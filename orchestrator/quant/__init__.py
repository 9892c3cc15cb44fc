"""The shared fake-quant core: torch only (no Ray, MLflow or Hydra).

    from orchestrator.quant import QuantizationSimModel, QuantConfig
"""

from .config import QuantConfig
from .encoding import Encoding
from .errors import (
    EncodingsFileError,
    NotCalibratedError,
    QuantConfigError,
    QuantError,
    UntraceableModelError,
)
from .export import ExportError
from .host_memory import keep_freed_host_memory
from .qdq import QdqRunner, build_qdq_model
from .quantizer import ActivationQuantizer, WeightQuantizer
from .sim import QuantizationSimModel

__all__ = [
    "ActivationQuantizer",
    "Encoding",
    "EncodingsFileError",
    "ExportError",
    "NotCalibratedError",
    "QdqRunner",
    "QuantConfig",
    "QuantConfigError",
    "QuantError",
    "QuantizationSimModel",
    "UntraceableModelError",
    "WeightQuantizer",
    "build_qdq_model",
    "keep_freed_host_memory",
]
