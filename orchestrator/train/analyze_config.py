"""``qat-analyze``'s own settings (the ``analyze`` node of its config; ``train/analyze.py`` runs it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..tasks import Task
from .config import TrialConfigError

SPLITS = ("val", "test")
SQNR = "sqnr"


@dataclass
class AnalyzeSpec:
    """``metric``: ``sqnr`` (output SQNR vs FP32 on the calibration batches, dB) or a metric of the
    task (``acc``, ``top5``; ``loss``, ``ppl``) measured on ``split``. ``split``: ``val`` or ``test``,
    where the task's metrics (FP32, PTQ, and a task ``metric``) are measured; ``val`` by default,
    as a ranking that chooses mixed precision is a selection, and selections use validation data.
    ``top_k``: how many of the most sensitive names the run's tag and the summary name."""

    metric: str = SQNR
    split: str = "val"
    top_k: int = 5

    def validate(self, task: Task | None = None) -> AnalyzeSpec:
        allowed = [SQNR] + ([m.name for m in task.metrics] if task is not None else [])
        if not isinstance(self.metric, str) or (task is not None and self.metric not in allowed):
            raise TrialConfigError(f"analyze.metric={self.metric!r} is not allowed; allowed: {', '.join(allowed)}"
                                   " (sqnr: output SQNR vs FP32 in dB; else a metric of the task)")
        if self.split not in SPLITS:
            raise TrialConfigError(f"analyze.split={self.split!r} is not allowed; allowed: {', '.join(SPLITS)}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise TrialConfigError(f"analyze.top_k={self.top_k!r} is not allowed; allowed: an integer >= 1")
        return self

    @property
    def column(self) -> str:
        """The score's name in the table's columns (``sqnr_db`` or the task metric's name)."""
        return "sqnr_db" if self.metric == SQNR else self.metric
