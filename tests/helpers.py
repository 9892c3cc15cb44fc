"""Helpers shared by the tests: accuracy, a plain training loop, a calibration callback."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


def accuracy(model: torch.nn.Module, dataset) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) on a TensorDataset."""
    was_training = model.training
    model.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item() * 100
    model.train(was_training)
    return acc


def train_epochs(model, dataset, epochs: int, lr: float, params=None, seed: int = 0) -> None:
    """Plain Adam training with cross-entropy, batch 64."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=gen)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def run_batches(model, batches):
    """The forward_pass_callback used with compute_encodings."""
    for b in batches:
        model(b)
