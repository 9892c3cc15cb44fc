"""QAT orchestrator: quantization-aware training sweeps on Ray, tracked in MLflow."""

__version__ = "0.1.0"
