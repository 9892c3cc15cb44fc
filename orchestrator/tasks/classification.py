"""Classification of images, sequences or anything else: cross-entropy, top-1 and top-k accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import Metric, Task


class Classification(Task):
    """One label per sample. Batches: ``(x, y)`` (or ``(*args, y)``: the model gets ``args``), or
    a dict whose ``label_key`` entry holds the labels ``[N]`` (int64) and whose other entries are
    the model's keyword arguments. Logits ``[N, C]``.

    Metrics (percent of samples): ``acc`` (top-1, primary) and ``top{k}`` (the label among the
    ``k`` largest logits; equals ``acc`` ... 100 as ``k`` reaches ``C``).
    """

    primary = "acc"

    def __init__(self, label_key: str = "labels", top_k: int = 5, label_smoothing: float = 0.0) -> None:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 2:
            raise ValueError(f"task.args.top_k={top_k!r} is not allowed; allowed: an integer >= 2")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"task.args.label_smoothing={label_smoothing!r} is not allowed; allowed: a number in [0, 1)")
        self.label_key, self.top_k, self.label_smoothing = label_key, top_k, float(label_smoothing)
        self.metrics = (Metric("acc", "max", percent_of_samples=True),
                        Metric(f"top{top_k}", "max", percent_of_samples=True))

    def inputs(self, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return {k: v for k, v in batch.items() if k != self.label_key}
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0] if len(batch) == 2 else tuple(batch[:-1])
        raise TypeError(f"a classification batch is (inputs, labels) or a dict with {self.label_key!r}; "
                        f"got {type(batch).__name__}")

    def targets(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise KeyError(f"a classification batch dict needs its labels under {self.label_key!r} "
                               f"(task.args.label_key); it has {sorted(batch)}")
            return batch[self.label_key]
        return batch[-1]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def metric_sums(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        k = min(self.top_k, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top == targets.unsqueeze(-1)
        return {"correct": float(hits[:, 0].sum()), "correct_k": float(hits.any(-1).sum()),
                "samples": float(targets.numel())}

    def compute_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("samples", 0.0), 1.0)
        return {"acc": 100.0 * sums.get("correct", 0.0) / n, f"top{self.top_k}": 100.0 * sums.get("correct_k", 0.0) / n}

    def chance(self, num_outputs: int) -> dict[str, float]:
        return {"acc": 100.0 / num_outputs, f"top{self.top_k}": 100.0 * min(self.top_k, num_outputs) / num_outputs}
