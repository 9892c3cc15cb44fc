"""The shared fake-quant core: torch only (no Ray, MLflow or Hydra).

    from orchestrator.quant import QuantizationSimModel, QuantConfig
"""

from .agreement import ExportAgreement, export_agreement
from .config import QuantConfig
from .encoding import Encoding
from .errors import (
    CalibrationError,
    EncodingsFileError,
    NotCalibratedError,
    QuantConfigError,
    QuantError,
    QuantFileError,
)
from .export import ExportError
from .host_memory import keep_freed_host_memory
from .layers import QuantizedModule, register
from .lora import LoraAdapter, add_lora, merge_lora
from .outliers import OutlierWarning
from .qdq import QdqRunner, build_qdq_model
from .quantizer import QuantizeDequantize
from .sim import EncodingCollapseWarning, QuantizationSimModel

__all__ = [
    "CalibrationError",
    "Encoding",
    "EncodingCollapseWarning",
    "OutlierWarning",
    "EncodingsFileError",
    "ExportAgreement",
    "ExportError",
    "LoraAdapter",
    "NotCalibratedError",
    "QdqRunner",
    "QuantConfig",
    "QuantConfigError",
    "QuantError",
    "QuantFileError",
    "QuantizationSimModel",
    "QuantizeDequantize",
    "QuantizedModule",
    "add_lora",
    "build_qdq_model",
    "export_agreement",
    "keep_freed_host_memory",
    "merge_lora",
    "register",
]
