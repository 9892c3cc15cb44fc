"""A user's own data and task, as ``data._target_`` / ``task._target_`` name them in the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from orchestrator.tasks import Metric, Task
from orchestrator.zoo.datasets import DataSplits


class ImageFolder(Dataset):
    """``root/<class>/<name>.npy`` images (float32 ``[1, 8, 8]``), read from disk when asked for:
    nothing is loaded when the dataset is built (torchvision's ImageFolder layout)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(f, i) for i, c in enumerate(self.classes) for f in sorted((root / c).glob("*.npy"))]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        return torch.from_numpy(np.load(path)), label


def image_folders(root: str) -> DataSplits:
    """``root/{train,val,test}/<class>/*.npy``."""
    splits = {s: ImageFolder(Path(root) / s) for s in ("train", "val", "test")}
    return DataSplits(splits["train"], splits["val"], splits["test"],
                      model_args={"num_classes": len(splits["train"].classes)})


class SumRegression(Task):
    """Predict the sum of a sample's inputs: mean squared error, metrics ``mse`` (primary) and ``mae``,
    both lower-is-better. Batches ``(x, y)`` with ``y`` float ``[N]``; the model outputs ``[N, 1]``."""

    primary = "mse"
    metrics = (Metric("mse", "min"), Metric("mae", "min"))

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def inputs(self, batch):
        return batch[0]

    def targets(self, batch):
        return batch[1] * self.scale

    def loss(self, logits, targets):
        return nn.functional.mse_loss(logits.squeeze(-1), targets)

    def metric_sums(self, logits, targets):
        err = logits.squeeze(-1) - targets
        return {"sq": (err ** 2).sum(), "abs": err.abs().sum(), "n": float(targets.numel())}

    def compute_metrics(self, sums):
        n = max(sums["n"], 1.0)
        return {"mse": sums["sq"] / n, "mae": sums["abs"] / n}

    def uniform_loss(self, logits):
        return None


def sums_data(n: int = 1024, features: int = 8, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)

    def split(k: int):
        x = torch.rand(k, features, generator=g)
        return torch.utils.data.TensorDataset(x, x.sum(1))

    return DataSplits(split(n), split(256), split(256), model_args={"in_features": features})


class Mlp(nn.Module):
    def __init__(self, in_features: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)


# ---- data a careless user hands over (tests/train/test_run_identity.py) -----------------------
# (each takes the built-in digits' arguments, which the data=digits group passes as data.args)
def _digits_splits(digits_args: dict, **replace) -> DataSplits:
    from orchestrator.zoo.datasets import digits

    d = digits(**digits_args)
    splits = {"train": d.train, "val": d.val, "test": d.test, **replace}
    return DataSplits(splits["train"], splits["val"], splits["test"], model_args=dict(d.model_args))


def digits_empty_val(**digits_args) -> DataSplits:
    """The digits with a validation split of no samples."""
    from torch.utils.data import TensorDataset

    return _digits_splits(digits_args, val=TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)))


def digits_label_12(**digits_args) -> DataSplits:
    """The digits (10 classes) with test sample 300 labelled 12."""
    from torch.utils.data import TensorDataset

    x, y = _digits_splits(digits_args).test.tensors
    y = y.clone()
    y[300] = 12
    return _digits_splits(digits_args, test=TensorDataset(x, y))


def digits_rgb(**digits_args) -> DataSplits:
    """The digits as 3-channel images ``[3, 8, 8]`` in every split: the digits CNN takes 1 channel."""
    from torch.utils.data import TensorDataset

    d = _digits_splits(digits_args)
    rgb = {s: TensorDataset(getattr(d, s).tensors[0].expand(-1, 3, -1, -1).contiguous(), getattr(d, s).tensors[1])
           for s in ("train", "val", "test")}
    return _digits_splits(digits_args, **rgb)


def accumulating_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, ctx, every: int = 2):
    """A user's own training epoch (``qat.loop._target_``): one optimizer step per ``every`` batches, on
    the sample-weighted mean gradient of the group (each batch's backward pass sums ``loss * samples``,
    ``ctx.step`` divides by the group's samples), with the trial's loss, autocast and gradient norm."""
    from orchestrator.tasks import to_device
    from orchestrator.train.loops import EpochResult

    model.train()
    loss_sum, samples, group = 0.0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        batch = to_device(batch, ctx.device)
        n = ctx.task.samples(batch)
        _, task_loss, loss, _ = ctx.losses(model, batch)
        (loss * n).backward()
        group, samples, loss_sum = group + n, samples + n, loss_sum + float(task_loss.detach()) * n
        if (i + 1) % every == 0 or i == len(loader) - 1:
            if not ctx.step(optimizer, float(group)):
                return EpochResult(loss_sum, samples=samples, diverged_step=i)
            optimizer.zero_grad(set_to_none=True)
            group = 0
    return EpochResult(loss_sum, samples=samples)
