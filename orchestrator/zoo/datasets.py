"""Built-in datasets: scikit-learn's bundled digits, and synthetic tensors for speed work.

Each builder returns ``DataSplits``: train/val/test ``TensorDataset``s of ``(x, y)`` with
``x`` float32 ``[N, *input_shape]`` and ``y`` int64 ``[N]``. Calibration batches are drawn
from ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class DataSplits:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 8, 8)
    num_classes: int


def _stratified_split(y: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Indices of (train, val, test), each class split in the same proportions."""
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
    """scikit-learn's 1,797 8x8 digit images, pixel values scaled to [0, 1]; 10 classes.

    The split is fixed by ``seed`` and stratified by class (defaults: 65% / 15% / 20%).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, val, test = _stratified_split(y, (val_fraction, test_fraction), seed)

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    return DataSplits(subset(train), subset(val), subset(test), (1, 8, 8), 10)


def synthetic(input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, train_size: int = 2048,
              val_size: int = 256, test_size: int = 256, seed: int = 0) -> DataSplits:
    """Random normal inputs with random labels, for speed work (accuracy is meaningless)."""
    gen = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        return TensorDataset(torch.randn((n, *input_shape), generator=gen),
                             torch.randint(0, num_classes, (n,), generator=gen))

    return DataSplits(make(train_size), make(val_size), make(test_size), tuple(input_shape), num_classes)
