"""Token-level language modelling: next-token cross-entropy, loss and perplexity per token."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import Metric, Task

IGNORE = -100  # the label of a position that is not scored (padding), as in PyTorch and transformers


class LanguageModeling(Task):
    """Predict every token from those before it (``shift=True``, causal LMs such as GPT-2) or at
    its own position (``shift=False``: masked LMs, whose ``labels`` are already aligned).

    Batches: token ids ``[N, L]`` (int64), or a dict of the model's keyword arguments
    (``input_ids``, ``attention_mask``, ...) plus optional ``labels`` ``[N, L]`` (positions set to
    -100 are not scored); without ``labels`` the targets are ``input_ids`` with the padding
    (``attention_mask == 0``) not scored. Logits ``[N, L, V]``.

    Metrics per scored token: ``loss`` (mean cross-entropy in nats) and ``ppl`` = ``exp(loss)``
    (primary; lower is better).
    """

    primary = "ppl"
    metrics = (Metric("loss", "min"), Metric("ppl", "min"))
    ignored = (IGNORE,)

    def __init__(self, shift: bool = True, label_key: str = "labels", ids_key: str = "input_ids") -> None:
        self.shift, self.label_key, self.ids_key = bool(shift), label_key, ids_key

    def inputs(self, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return {k: v for k, v in batch.items() if k != self.label_key}
        return batch

    def targets(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping):
            if self.label_key in batch:
                return batch[self.label_key]
            if self.ids_key not in batch:
                raise KeyError(f"a language-modelling batch dict needs {self.ids_key!r} or {self.label_key!r}; "
                               f"it has {sorted(batch)}")
            ids = batch[self.ids_key]
            mask = batch.get("attention_mask")
            return ids if mask is None else ids.masked_fill(mask == 0, IGNORE)
        if isinstance(batch, torch.Tensor):
            return batch
        raise TypeError(f"a language-modelling batch is a tensor of token ids or a dict; got {type(batch).__name__}")

    def _aligned(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P, V] logits, [P] labels)`` over every position (scored or not)."""
        if self.shift:
            logits, targets = logits[:, :-1], targets[:, 1:]
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, labels = self._aligned(logits, targets)
        return F.cross_entropy(rows.float(), labels, ignore_index=IGNORE)

    def metric_sums(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        rows, labels = self._aligned(logits, targets)
        nll = F.cross_entropy(rows.float(), labels, ignore_index=IGNORE, reduction="sum")
        return {"nll": float(nll), "tokens": float((labels != IGNORE).sum())}

    def compute_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums.get("nll", 0.0) / max(sums.get("tokens", 0.0), 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}

    def prediction_rows(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, labels = self._aligned(logits, targets)
        return rows[labels != IGNORE]

    def chance(self, num_outputs: int) -> dict[str, float]:
        return {"loss": math.log(num_outputs), "ppl": float(num_outputs)}
