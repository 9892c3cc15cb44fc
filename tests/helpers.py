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


def train_epochs(model, dataset, epochs: int, lr: float, params=None, seed: int = 0, cosine: bool = False) -> None:
    """Plain Adam training with cross-entropy, batch 64; ``seed`` orders the data.

    ``cosine``: anneal the learning rate from ``lr`` to 0 over the run (the usual fine-tuning
    recipe; a constant rate leaves the last step's weights wherever the noise put them)."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=gen)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader)) if cosine else None
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if schedule is not None:
                schedule.step()


def run_batches(model, batches):
    """The forward_pass_callback used with compute_encodings."""
    for b in batches:
        model(b)


def plant_fragile_layer(first: torch.nn.Linear, middle: torch.nn.Linear) -> None:
    """Make ``middle`` (the linear layer after ``first`` and a ReLU) fragile: hidden unit 5 of
    ``first`` always 0 (a dead ReLU), and every row of ``middle`` holds a weight 50x its others on
    that unit. Harmless in float (the unit is 0), but at 4 bits per channel the rest of each row
    rounds to a grid 50x too coarse."""
    with torch.no_grad():
        first.weight[5] = 0.0
        first.bias[5] = -1.0
        middle.weight[:, 5] = 50 * middle.weight.abs().max()


def fragile_mlp(inputs: int = 16, outputs: int = 8) -> torch.nn.Module:
    """Three linear layers (``inputs`` -> 32 -> 32 -> ``outputs``, seeded) whose middle one
    (``2.weight``) is made fragile by ``plant_fragile_layer``: the planted fragile layer."""
    from torch import nn

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, outputs)).eval()
    plant_fragile_layer(model[0], model[2])
    return model
