"""``DataSplits`` and the small built-in datasets: scikit-learn's digits and synthetic tensors.

A data builder (built-in, or a user's ``data._target_``) returns ``DataSplits``: three
``torch.utils.data.Dataset``s (map-style or iterable; samples of any form: ``(x, y)`` tuples,
dicts of tensors, ...), an optional ``collate_fn`` that turns a list of samples into a batch,
and ``model_args``: what a built-in model needs to know of the data (``num_classes``,
``vocab_size``). Trials read the splits through ``DataLoader``s; nothing here must fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass(frozen=True)
class DataSplits:
    """A trial's data. ``collate_fn``: list of samples -> batch (default: PyTorch's
    ``default_collate``). ``model_args``: constructor arguments a model builder may take from
    the data (passed to built-in and ``_target_`` models that name them, unless ``model.args``
    sets them)."""

    train: Dataset
    val: Dataset
    test: Dataset
    collate_fn: Callable[[list], Any] | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)


def stratified_split(y: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Indices of (train, val, test), each class split in the same proportions (``fractions``:
    val, test)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_val = int(round(len(idx) * fractions[0]))
        n_test = int(round(len(idx) * fractions[1]))
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val:n_val + n_test])
        parts[0].extend(idx[n_val + n_test:])
    return tuple(np.sort(np.array(p, dtype=np.int64)) for p in parts)


def digits(val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 8x8 digit images ``[1, 8, 8]``, pixel values scaled to [0, 1]; 10 classes.

    The split is fixed by ``seed`` and stratified by class (defaults: 65% / 15% / 20%).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, val, test = stratified_split(y, (val_fraction, test_fraction), seed)

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    return DataSplits(subset(train), subset(val), subset(test), model_args={"num_classes": 10})


def synthetic(input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, train_size: int = 2048,
              val_size: int = 256, test_size: int = 256, seed: int = 0) -> DataSplits:
    """Random normal inputs with random labels, for speed work (accuracy is meaningless)."""
    gen = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        return TensorDataset(torch.randn((n, *input_shape), generator=gen),
                             torch.randint(0, num_classes, (n,), generator=gen))

    return DataSplits(make(train_size), make(val_size), make(test_size), model_args={"num_classes": num_classes})
