"""Step 1 of a trial on one rank: what it works on, built from the config (task, data loaders,
the pretrained FP32 model, the calibration batches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..tasks import Task, head, to_device
from ..zoo.datasets import DataSplits
from .builders import build_data, load_pretrained, task_of
from .config import TrialConfig
from .data import calibration_batches, eval_loader


@dataclass
class TrialInputs:
    """``loaders``: this rank's exact ``val``/``test`` shards. ``calibration``: batches on the device,
    the same on every rank. ``dummy``: the model's inputs for 2 samples (how the sim and the export
    call it). ``num_outputs``: the model's output width (the chance level of the divergence check)."""

    task: Task
    data: DataSplits
    loaders: dict[str, DataLoader]
    model: nn.Module
    calibration: list[Any]
    dummy: Any
    num_outputs: int

    def reload_model(self, cfg: TrialConfig) -> nn.Module:
        """A fresh copy of the pretrained model on the CPU (the export's unsharded simulation)."""
        return load_pretrained(cfg.model, self.data, cfg.model.checkpoint)


def build_inputs(cfg: TrialConfig, rank: int, world: int, device: torch.device) -> TrialInputs:
    qat = cfg.qat
    task = task_of(cfg.task)
    data = build_data(cfg.data)
    loaders = {split: eval_loader(getattr(data, split), qat.eval_batch_size, rank, world, device, data.collate_fn,
                                  cfg.data.loader_workers) for split in ("val", "test")}
    model = load_pretrained(cfg.model, data, cfg.model.checkpoint).to(device)
    calibration = [to_device(b, device) for b in calibration_batches(
        data.train, qat.batch_size, qat.calibration_batches, qat.seed, data.collate_fn)]
    with torch.no_grad():
        num_outputs = int(task.forward(model, calibration[0]).shape[-1])
    return TrialInputs(task, data, loaders, model, calibration, head(task.inputs(calibration[0]), 2), num_outputs)
