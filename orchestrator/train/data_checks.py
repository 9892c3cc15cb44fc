"""Data checks before any metric is measured or any run is created.

A split with no samples, a batch the model rejects, or a target outside the model's outputs (a
label 12 for a 10-class model) would otherwise surface late: as "divergence", or as an error
after FP32 and PTQ were measured on broken data. Each is refused here with one line naming the
split, the sample index and the value.

Cost: the model sees the first two samples of each split once; targets are read for the first
``SCANNED_SAMPLES`` samples of each split (all of a small split), in order, without the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from ..tasks import Task, head
from ..tasks.batches import batch_size as samples_in
from .config import TrialConfigError
from .data import is_iterable

SCANNED_SAMPLES = 20_000
SPLITS = ("train", "val", "test")


class DataCheckError(TrialConfigError):
    """The data cannot train or measure this model (one line: split, sample index, value)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def check_data(task: Task, data, model: torch.nn.Module, batch_size: int) -> None:
    """Refuse ``data`` (``DataSplits``) with ``DataCheckError`` when a split is empty, the model
    raises on a split's first batch, or a target names no output of the model."""
    for split in SPLITS:
        dataset = getattr(data, split)
        if not is_iterable(dataset) and len(dataset) == 0:
            raise DataCheckError(f"data: the {split} split has no samples")
        loader = DataLoader(dataset, batch_size=min(batch_size, 256), shuffle=False, collate_fn=data.collate_fn)
        seen, num_outputs = 0, None
        for batch in loader:
            n = samples_in(batch)
            if num_outputs is None:
                num_outputs = _outputs(task, model, batch, split, n)
            _check_targets(task, batch, num_outputs, split, seen)
            seen += n
            if seen >= SCANNED_SAMPLES:
                break
        if seen == 0:
            raise DataCheckError(f"data: the {split} split has no samples")


def _outputs(task: Task, model: torch.nn.Module, batch: Any, split: str, n: int) -> int:
    """The model's output classes (its logits' last dimension) on ``batch``, or refuse the batch."""
    try:
        with torch.no_grad():
            logits = task.forward(model, head(batch, 2))
    except Exception as exc:  # noqa: BLE001 - any error the model raises is the user's to see, in one line
        raise DataCheckError(f"data: the model rejects the first batch of the {split} split (samples "
                             f"0-{min(n, 2) - 1}): {_first_line(exc)}") from None
    return int(logits.shape[-1])


def _check_targets(task: Task, batch: Any, num_outputs: int, split: str, first_index: int) -> None:
    try:
        targets = task.targets(batch)
    except Exception as exc:  # noqa: BLE001 - a batch layout the task cannot read
        raise DataCheckError(f"data: the task cannot read the targets of the {split} split's batch at sample "
                             f"{first_index}: {_first_line(exc)}") from None
    bad = task.invalid_target(targets, num_outputs)
    if bad is not None:
        row, value = bad
        raise DataCheckError(f"data: sample {first_index + row} of the {split} split has target {value}, which names "
                             f"no output of the model (allowed: 0-{num_outputs - 1})")
