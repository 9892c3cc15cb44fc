"""Trials through the same generic path on other data and tasks: image files read lazily by loader
workers, a transformers model fed dict batches, language modelling with perplexity, a user's task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_trial import trial_config
from mlflow import MlflowClient

from orchestrator.train.launcher import run_trial
from orchestrator.zoo.datasets import digits


def _write_image_folders(root) -> None:
    data = digits()
    for split in ("train", "val", "test"):
        x, y = getattr(data, split).tensors
        for i, (image, label) in enumerate(zip(x.numpy(), y.tolist())):
            folder = root / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{i:05d}.npy", image)


def test_image_folder_read_lazily_by_loader_workers(tmp_path, baseline_cache):
    from user_code import ImageFolder

    root = tmp_path / "images"
    _write_image_folders(root)
    lazy = ImageFolder(root / "test")
    first, _ = lazy.files[0]
    np.save(first, np.full((1, 8, 8), 0.5, dtype=np.float32))  # changed after the dataset was built
    assert torch.all(lazy[0][0] == 0.5)  # read from disk when asked for, not at construction

    _write_image_folders(root)
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 1,
                                                     "data._target_": "user_code.image_folders",
                                                     "data.args": {"root": str(root)}, "data.loader_workers": 2})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["fp32_acc"] > 95 and m["test_acc"] > 95
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.metrics["test_samples"] == len(digits().test) and run.data.params["data._target_"] == "user_code.image_folders"


def test_a_transformers_model_trains_on_dict_batches(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 1,
                                                     "model.name": "bert_tiny", "data.name": "majority_tokens",
                                                     "model.pretrain_epochs": 6, "model.pretrain_lr": 1e-3,
                                                     "data.args": {"train_size": 2000, "val_size": 300,
                                                                   "test_size": 300}})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["fp32_acc"] > 80 and m["test_acc"] > m["fp32_acc"] - 5
    doc = (tmp_path / "trial" / "export" / "model.encodings").read_text()
    assert '"input_ids"' not in doc  # token ids are not quantized
    assert "bert.encoder.layer.0.attention.self.sdpa_0.probs" in doc  # attention probabilities are


def test_language_modelling_reports_loss_and_perplexity(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 2,
                                                     "model.name": "gpt2_tiny", "data.name": "markov_text",
                                                     "task.name": "language_modeling", "model.pretrain_epochs": 3,
                                                     "model.pretrain_lr": 3e-3, "quant.param_bw": 4,
                                                     "data.args": {"train_size": 2000, "val_size": 300,
                                                                   "test_size": 300}})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished"
    for stage in ("fp32", "ptq", "val", "test"):
        assert m[f"{stage}_ppl"] == pytest.approx(math.exp(m[f"{stage}_loss"]), rel=1e-6)
    assert m["fp32_ppl"] < 8 < 64  # learned the chain (3 successors per token) far below a uniform guess
    assert m["test_ppl"] < m["fp32_ppl"] * 1.2
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert {"fp32_ppl", "ptq_ppl", "val_ppl", "test_ppl", "val_loss"} <= set(run.data.metrics)
    assert "val_acc" not in run.data.metrics and run.data.params["task.name"] == "language_modeling"
    assert [h.step for h in client.get_metric_history(result.run_id, "val_ppl")] == [0, 1]


def test_a_user_task_brings_its_own_loss_and_metrics(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 2,
                                                     "model._target_": "user_code.Mlp", "model.name": "mlp",
                                                     "data._target_": "user_code.sums_data", "data.name": "sums",
                                                     "task._target_": "user_code.SumRegression", "task.name": "sum",
                                                     "task.args": {"scale": 0.5}, "model.pretrain_epochs": 20})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["fp32_mse"] < 0.05 and m["test_mse"] < 0.05
    assert m["test_mae"] == pytest.approx(m["test_mae"]) and "test_acc" not in m
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.params["task._target_"] == "user_code.SumRegression"
    assert {"fp32_mse", "ptq_mae", "val_mse", "test_mae"} <= set(run.data.metrics)
