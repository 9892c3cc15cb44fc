"""One trial in-process (trainer.num_workers=0): the five steps, MLflow content, divergence, resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_trial import trial_config
from mlflow import MlflowClient

from orchestrator.train.config import TrialConfig, TrialConfigError
from orchestrator.train.launcher import TrialFailed, run_trial
from orchestrator.zoo.pretrained import load_checkpoint

METRICS = ("fp32_acc", "ptq_acc", "train_loss", "val_acc", "lr", "epoch_time_s", "samples_per_s", "test_acc")


def test_pretrained_baseline_is_real_and_cached(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 0})
    first = run_trial(cfg)
    state, meta = load_checkpoint(first.config.model.checkpoint)
    assert meta["fp32_test_acc"] >= 98.5
    assert first.metrics["fp32_acc"] == pytest.approx(meta["fp32_test_acc"])
    mtime = __import__("os").path.getmtime(first.config.model.checkpoint)
    second = run_trial(trial_config(tmp_path, baseline_cache, name="again", **{"trainer.num_workers": 0, "qat.epochs": 0}))
    assert second.config.model.checkpoint == first.config.model.checkpoint
    assert __import__("os").path.getmtime(second.config.model.checkpoint) == mtime  # not retrained


def test_in_process_trial_logs_everything_to_mlflow(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 3,
                                                     "quant.param_bw": 4, "quant.output_bw": 4,
                                                     "qat.range_learning": True})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["test_acc"] >= m["fp32_acc"] - 1.5
    for kind in ("pth", "onnx", "encodings"):
        assert (tmp_path / "trial" / "export" / f"model.{kind}").is_file()

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["qat.lr"] == "0.001" and params["quant.param_bw"] == "4" and params["qat.range_learning"] == "True"
    tags = run.data.tags
    assert tags["qat.mode"] == "range_learning" and tags["qat.param_bw"] == "4" and tags["qat.output_bw"] == "4"
    assert tags["qat.trial_id"] == result.config.tracking.trial_id
    for key in METRICS:
        assert key in run.data.metrics, key
    for key in ("train_loss", "val_acc", "lr", "epoch_time_s", "samples_per_s"):
        assert [h.step for h in client.get_metric_history(result.run_id, key)] == [0, 1, 2], key
    lrs = [h.value for h in client.get_metric_history(result.run_id, "lr")]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4])  # divided by gamma=10 every 2 epochs

    artifacts = {a.path for a in client.list_artifacts(result.run_id, "export")}
    assert artifacts == {"export/model.pth", "export/model.onnx", "export/model.encodings",
                         "export/model.encodings.json"}
    for key in ("fp32_acc", "ptq_acc", "test_acc", "val_samples", "test_samples"):
        assert len(client.get_metric_history(result.run_id, key)) == 1, key  # logged once
    assert tags["qat.launcher"] == "in-process" and tags["qat.outcome"] == "finished"
    assert tags["qat.output_dir"] == str(tmp_path / "trial") and "output_dir" not in params
    local = client.download_artifacts(result.run_id, "export/model.encodings", str(tmp_path / "dl"))
    doc = json.loads(open(local).read())
    assert doc["version"] == "1.0.0" and doc["quantizer_args"]["activation_bitwidth"] == 4
    config = json.loads(open(client.download_artifacts(result.run_id, "config.json", str(tmp_path / "dl"))).read())
    assert TrialConfig.from_dict(config).qat.range_learning is True


def test_divergence_stops_the_trial_and_marks_the_run_failed(tmp_path, baseline_cache):
    # Quantization keeps even absurd weights finite (encodings clamp every activation; learned
    # scales are floored), so SGD at 1e30 does not produce NaN: the loss explodes instead.
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.optimizer": "sgd",
                                                     "qat.lr": 1e30, "qat.epochs": 3, "qat.range_learning": True,
                                                     "qat.learn_weight_encodings": True})
    with pytest.raises(TrialFailed, match=r"training diverged: mean training loss \S+ at epoch 0 is more than 3x "
                                          r"that of a uniform guess \(qat.lr=1e\+30"):
        run_trial(cfg)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("qat")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"


def test_in_process_trial_resumes_from_its_checkpoint(tmp_path, baseline_cache):
    """A trial stopped after its epoch-1 checkpoint continues at epoch 2 in the same MLflow run."""
    overrides = {"trainer.num_workers": 0, "qat.epochs": 3}
    full = run_trial(trial_config(tmp_path, baseline_cache, name="full", **overrides))

    cut = trial_config(tmp_path, baseline_cache, name="cut", **{**overrides, "qat.epochs": 2})
    first = run_trial(cut)
    ckpt_dir = tmp_path / "cut" / "checkpoints"
    last = sorted(ckpt_dir.glob("epoch_*.pt"))[-1]
    state = torch.load(last, weights_only=False)
    del state["final"]  # as if the process died right after the epoch-1 checkpoint
    torch.save(state, last)
    resumed = run_trial(trial_config(tmp_path, baseline_cache, name="cut", **overrides))
    assert resumed.run_id == first.run_id
    client = MlflowClient(resumed.tracking_uri)
    assert [h.step for h in client.get_metric_history(resumed.run_id, "val_acc")] == [0, 1, 2]
    assert resumed.metrics["test_acc"] == full.metrics["test_acc"]
    a = torch.load(tmp_path / "full" / "export" / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "export" / "model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same result as the uninterrupted run


@pytest.mark.parametrize("key,value,message", [
    ("quant.param_bw", 0, r"quant.param_bw=0 is not a supported bit width; allowed: an integer from 2 to 16"),
    ("quant.quant_scheme", "kl", r"quant.quant_scheme='kl' is not known; allowed: min_max, sqnr, percentile"),
    ("qat.optimizer", "lamb", r"qat.optimizer='lamb' is not allowed; allowed: sgd, adam"),
    ("qat.lr", 0.0, r"qat.lr=0.0 is not allowed; allowed: a number > 0"),
    ("trainer.num_workers", -1, r"trainer.num_workers=-1 is not allowed"),
    ("model.name", "vgg", r"model.name='vgg' is not a built-in model; allowed: digits_cnn, resnet_cifar"),
    ("data.name", "cifar", r"data.name='cifar' is not a built-in data; allowed: digits, synthetic"),
])
def test_invalid_values_are_rejected_before_anything_runs(tmp_path, baseline_cache, key, value, message):
    cfg = trial_config(tmp_path, baseline_cache, **{key: value})
    with pytest.raises(TrialConfigError, match=message):
        run_trial(cfg)
    assert not (tmp_path / "trial").exists() and not (tmp_path / "mlflow.db").exists()
