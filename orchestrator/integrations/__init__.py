"""Adapters to users' own training pipelines: they keep their code and get QAT.

- ``QatTrainer`` (``hf_trainer.py``): a Hugging Face ``transformers.Trainer`` that trains the
  quantization simulation of its model (needs the ``hf`` extra: transformers, accelerate).

This layer imports ``orchestrator.quant`` and the pipelines' own libraries, never Ray, MLflow or
Hydra. Names are imported on first use, so ``import orchestrator.integrations`` needs none of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QatTrainer"]


def __getattr__(name: str) -> Any:
    if name == "QatTrainer":
        from .hf_trainer import QatTrainer

        return QatTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
