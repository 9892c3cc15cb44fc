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
    assert meta["fp32_test"]["acc"] >= 98.5
    assert first.metrics["fp32_acc"] == pytest.approx(meta["fp32_test"]["acc"])
    mtime = __import__("os").path.getmtime(first.config.model.checkpoint)
    second = run_trial(trial_config(tmp_path, baseline_cache, name="again", **{"trainer.num_workers": 0, "qat.epochs": 0}))
    assert second.config.model.checkpoint == first.config.model.checkpoint
    assert __import__("os").path.getmtime(second.config.model.checkpoint) == mtime  # not retrained


def test_in_process_trial_logs_everything_to_mlflow(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 3,
                                                     "quant.param_bw": 4, "quant.output_bw": 4,
                                                     "qat.range_learning": True, "qat.schedule": "step"})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["test_acc"] >= m["fp32_acc"] - 1.5
    # the trial checked its own export in onnxruntime (2 test batches of at most 64 samples)
    assert m["qdq_agree_top1"] == 1.0 and m["qdq_sqnr_db"] >= 30.0, m
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
    for key in (*METRICS, "qdq_agree_top1", "qdq_sqnr_db", "qdq_max_abs_diff"):
        assert key in run.data.metrics, key
    for key in ("train_loss", "val_acc", "val_top5", "lr", "epoch_time_s", "samples_per_s"):
        assert [h.step for h in client.get_metric_history(result.run_id, key)] == [0, 1, 2], key
    lrs = [h.value for h in client.get_metric_history(result.run_id, "lr")]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4])  # divided by gamma=10 every 2 epochs

    artifacts = {a.path for a in client.list_artifacts(result.run_id, "export")}
    assert artifacts == {"export/model.pth", "export/model.onnx", "export/model.encodings",
                         "export/model.encodings.json"}
    for key in ("fp32_acc", "fp32_top5", "ptq_acc", "ptq_top5", "test_acc", "test_top5", "val_samples",
                "test_samples"):
        assert len(client.get_metric_history(result.run_id, key)) == 1, key  # logged once
    assert tags["qat.launcher"] == "in-process" and tags["qat.outcome"] == "finished"
    assert tags["qat.output_dir"] == str(tmp_path / "trial") and "output_dir" not in params
    local = client.download_artifacts(result.run_id, "export/model.encodings", str(tmp_path / "dl"))
    doc = json.loads(open(local).read())
    assert doc["version"] == "1.0.0" and doc["quantizer_args"]["activation_bitwidth"] == 4
    config = json.loads(open(client.download_artifacts(result.run_id, "config.json", str(tmp_path / "dl"))).read())
    assert TrialConfig.from_dict(config).qat.range_learning is True


def test_a_model_left_at_chance_is_a_diverged_trial_not_a_finished_one(tmp_path, baseline_cache):
    # Quantization keeps even absurd weights finite (encodings clamp every activation; learned
    # scales are floored), so Adam at lr=1 does not produce NaN: the accuracy collapses instead.
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.lr": 1.0, "qat.epochs": 2,
                                                     "qat.range_learning": True})
    with pytest.raises(TrialFailed, match=r"training diverged: val_acc \S+ is no better than a random guess after 2 "
                                          r"epoch\(s\) \(FP32: \S+; qat.lr=1.0\); lower qat.lr"):
        run_trial(cfg)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("qat")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["qat.outcome"] == "diverged"
    assert not (tmp_path / "trial" / "export").exists()  # nothing exported from a broken model


def test_divergence_rules():
    from orchestrator.tasks import Classification, LanguageModeling
    from orchestrator.train.divergence import exploded_loss, stayed_at_chance

    assert exploded_loss(7.0, 2.3) and not exploded_loss(6.8, 2.3) and exploded_loss(float("nan"), 2.3)
    assert not exploded_loss(1e9, None)  # a user task without a uniform-guess reference
    clf = Classification()
    assert stayed_at_chance(clf, 10, {"acc": 95.0}, {"acc": 10.3})
    assert not stayed_at_chance(clf, 10, {"acc": 95.0}, {"acc": 30.0})
    assert not stayed_at_chance(clf, 10, {"acc": 12.0}, {"acc": 10.0})  # the FP32 model is near chance itself
    lm = LanguageModeling()  # perplexity: lower is better, chance = vocabulary size
    assert stayed_at_chance(lm, 64, {"ppl": 3.5, "loss": 1.25}, {"ppl": 63.0, "loss": 4.14})
    assert not stayed_at_chance(lm, 64, {"ppl": 3.5, "loss": 1.25}, {"ppl": 5.0, "loss": 1.6})


def test_in_process_trial_resumes_from_its_checkpoint(tmp_path, baseline_cache):
    """A trial stopped after its epoch-1 checkpoint continues at epoch 2 in the same MLflow run, to
    the same result. (The stop: the last checkpoint, which holds the final report, is deleted.)"""
    cfg = trial_config(tmp_path, baseline_cache, name="cut", **{"trainer.num_workers": 0, "qat.epochs": 3,
                                                               "qat.schedule": "step"})
    full = run_trial(cfg)
    a = torch.load(tmp_path / "cut" / "export" / "model.pth", weights_only=True)
    last = sorted((tmp_path / "cut" / "checkpoints").glob("epoch_*.pt"))[-1]
    assert last.name == "epoch_0002.pt" and "final" in torch.load(last, weights_only=True)
    last.unlink()  # as if the process died right after the epoch-1 checkpoint
    resumed = run_trial(cfg)
    assert resumed.run_id == full.run_id and resumed.metrics["resumed_from_epoch"] == 1
    client = MlflowClient(resumed.tracking_uri)
    assert sorted({h.step for h in client.get_metric_history(resumed.run_id, "val_acc")}) == [0, 1, 2]
    assert resumed.metrics["test_acc"] == full.metrics["test_acc"]
    b = torch.load(tmp_path / "cut" / "export" / "model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same result as the uninterrupted run


@pytest.mark.slow
def test_a_compiled_trial_trains_like_the_eager_one(tmp_path, baseline_cache):
    """``trainer.compile=true``: the compiled sim trains (its losses follow the eager trial's, within
    15%), and the compilation is reported apart (``compile_warmup_s``)."""
    overrides = {"trainer.num_workers": 0, "qat.epochs": 2, "qat.range_learning": True}
    eager = run_trial(trial_config(tmp_path, baseline_cache, name="eager", **overrides))
    compiled = run_trial(trial_config(tmp_path, baseline_cache, name="compiled", **overrides,
                                      **{"trainer.compile": True}))
    client = MlflowClient(compiled.tracking_uri)
    losses = {name: [h.value for h in client.get_metric_history(r.run_id, "train_loss")]
              for name, r in (("eager", eager), ("compiled", compiled))}
    # Not bit-equal over epochs: compiled convolutions sum in another order, and a few values cross a
    # 4-bit boundary; a compiled sim that trained nothing would stay at its first loss (eager: 2.9x lower).
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=0.15), losses
    assert losses["compiled"][-1] < 0.6 * losses["compiled"][0], losses
    assert compiled.metrics["status"] == "finished"
    assert abs(compiled.metrics["test_acc"] - eager.metrics["test_acc"]) <= 1.0
    warmup = client.get_metric_history(compiled.run_id, "compile_warmup_s")
    assert len(warmup) == 1 and warmup[0].value > 0
    assert not client.get_metric_history(eager.run_id, "compile_warmup_s")


@pytest.mark.parametrize("key,value,message", [
    ("quant.param_bw", 0, r"quant.param_bw=0 is not a supported bit width; allowed: an integer from 2 to 16"),
    ("quant.quant_scheme", "kl", r"quant.quant_scheme='kl' is not known; allowed: min_max, sqnr, percentile"),
    ("qat.optimizer", "lamb", r"qat.optimizer='lamb' is not allowed; allowed: sgd, adam"),
    ("qat.lr", 0.0, r"qat.lr=0.0 is not allowed; allowed: a finite number in \(0, 10\]"),
    ("qat.lr", float("inf"), r"qat.lr=inf is not allowed; allowed: a finite number in \(0, 10\]"),
    ("qat.lr", 1e6, r"qat.lr=1000000.0 is not allowed"),
    ("qat.distill.temperature", 0, r"qat.distill.temperature=0 is not allowed; allowed: a finite number > 0"),
    ("task.name", "detection", r"task.name='detection' is not a built-in task; allowed: classification, "
                               r"language_modeling"),
    ("trainer.num_workers", -1, r"trainer.num_workers=-1 is not allowed"),
    ("model.name", "vgg", r"model.name='vgg' is not a built-in model; allowed: mnist1d_cnn, digits_cnn, "
                          r"resnet_cifar, bert_tiny, gpt2_tiny"),
    ("data.name", "cifar", r"data.name='cifar' is not a built-in data; allowed: mnist1d, digits, synthetic, "
                           r"majority_tokens, markov_text"),
])
def test_invalid_values_are_rejected_before_anything_runs(tmp_path, baseline_cache, key, value, message):
    cfg = trial_config(tmp_path, baseline_cache, **{key: value})
    with pytest.raises(TrialConfigError, match=message):
        run_trial(cfg)
    assert not (tmp_path / "trial").exists() and not (tmp_path / "mlflow.db").exists()
