"""Training the FP32 baseline of a built-in (or checkpoint-less) model with the trial's own task,
data loaders and loop: Adam, the learning rate annealed to zero over the epochs (cosine), a fixed
seed. Cached by ``zoo.pretrained`` so every trial of every sweep loads the same weights."""

from __future__ import annotations

import torch
from torch import nn

from ..tasks import Task
from ..zoo.datasets import DataSplits
from ..zoo.pretrained import PretrainRecipe
from .data import eval_loader, set_epoch, train_loader
from .loops import LoopContext, evaluate, train_epoch


def train_fp32(model: nn.Module, data: DataSplits, task: Task, recipe: PretrainRecipe,
               device: torch.device | None = None, workers: int = 0) -> dict[str, float]:
    """Train ``model`` in place on ``data.train``; returns its test metrics (``{"acc": ...}``)."""
    device = device or torch.device("cpu")
    torch.manual_seed(recipe.seed)
    model.to(device)
    loader, sampler = train_loader(data.train, recipe.batch_size, 0, 1, recipe.seed, device, data.collate_fn, workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    for epoch in range(recipe.epochs):
        set_epoch(data.train, sampler, epoch)
        result = train_epoch(model, loader, optimizer, LoopContext(task, device, params))
        if result.diverged_step is not None:
            raise RuntimeError(f"the FP32 baseline diverged in epoch {epoch} (non-finite gradients); "
                               "lower model.pretrain_lr")
        schedule.step()
    model.eval()
    return evaluate(model, eval_loader(data.test, 512, 0, 1, device, data.collate_fn, workers), task, device)
