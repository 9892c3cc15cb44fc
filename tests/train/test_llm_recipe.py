"""The LLM recipe on a tiny Llama and python_text: distillation on logits, AdamW with warmup +
cosine and clipping, the low-bit presets, and the recovered fraction of PTQ's perplexity loss."""

from __future__ import annotations

import math

import pytest
from helpers_trial import trial_config
from mlflow import MlflowClient

from orchestrator.train.launcher import run_trial

TINY = {"model.name": "llama_tiny", "data.name": "python_text", "task.name": "language_modeling",
        "model.args": {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64},
        "data.args": {"seq_len": 32, "modules": ["abc", "bisect", "codeop", "colorsys", "getopt", "keyword", "linecache"],
                      "docs": False, "val_fraction": 0.2, "test_fraction": 0.2, "max_train_samples": 256,
                      "max_eval_samples": 32},
        "model.pretrain_epochs": 10, "model.pretrain_lr": 3e-3, "model.pretrain_batch_size": 16, "trainer.num_workers": 0,
        "qat.epochs": 2, "qat.batch_size": 16, "qat.batches_per_epoch": 4, "qat.optimizer": "adamw",
        "qat.schedule": "warmup_cosine", "qat.warmup_steps": 2, "qat.grad_clip_norm": 1.0, "qat.lr": 1e-3,
        "qat.calibration_batches": 2, "qat.eval_batch_size": 64, "qat.qdq_check_batches": 1}


@pytest.mark.slow  # 4-10 s each (the first trains the tiny baseline)
@pytest.mark.parametrize("preset", [
    {"quant.param_bw": 2, "quant.param_block_size": 32, "quant.quantize_activations": False},  # quant=w2g32
    {"quant.param_bw": 4, "quant.param_block_size": 32, "quant.output_bw": 4,  # quant=w4g32a4
     "quant.output_granularity": "per_token", "quant.activation_sites": "layer_inputs"},
    {"quant.param_bw": 3, "quant.param_block_size": 32, "quant.quantize_activations": False},  # quant=w3g32
    {"quant.param_bw": 4, "quant.param_block_size": 128, "quant.quantize_activations": False},  # quant=w4g128
    {"quant.param_bw": 4, "quant.param_block_size": 32, "quant.output_bw": 8,  # quant=w4g32a8 (8da4w)
     "quant.output_granularity": "per_token", "quant.activation_sites": "layer_inputs"},
    {"quant.param_format": "float8_e4m3fn", "quant.output_format": "float8_e4m3fn",  # quant=fp8
     "quant.quant_scheme": "min_max", "quant.activation_sites": "layer_inputs"},
    {"quant.param_format": "nvfp4", "quant.output_format": "nvfp4",  # quant=nvfp4
     "quant.activation_sites": "layer_inputs"},
], ids=["w2g32", "w4g32a4", "w3g32", "w4g128", "w4g32a8", "fp8", "nvfp4"])
def test_a_tiny_llm_trial_distills_and_logs_recovered_perplexity(tmp_path, baseline_cache, preset):
    cfg = trial_config(tmp_path, baseline_cache, **TINY, **preset, **{
        "qat.distill.enabled": True, "qat.distill.temperature": 1.0, "qat.distill.weight": 1.0,
        "qat.distill.task_weight": 0.0})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished"
    assert m["fp32_ppl"] < 40 < 256  # learned bytes far below a uniform guess over 256
    gap = (m["ptq_ppl"] - m["fp32_ppl"]) / m["fp32_ppl"]
    assert m["ppl_ptq_gap"] == pytest.approx(gap)
    if gap >= 0.02:
        assert m["ppl_recovered"] == pytest.approx((m["ptq_ppl"] - m["test_ppl"]) / (m["ptq_ppl"] - m["fp32_ppl"]))
    else:
        assert "ppl_recovered" not in m
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["ppl_ptq_gap"] == pytest.approx(gap)
    assert ("ppl_recovered" in run.data.metrics) == (gap >= 0.02)
    assert run.data.params["qat.batches_per_epoch"] == "4"
    # 4 batches per epoch, each an optimizer step: warmup over 2 steps, cosine to 0 at step 8
    lrs = [h.value for h in client.get_metric_history(result.run_id, "lr")]
    assert len(lrs) == 2 and lrs[0] == pytest.approx(1e-3 / 3)  # the first epoch starts in the warmup
    assert [h.step for h in client.get_metric_history(result.run_id, "train_distill_loss")] == [0, 1]
    assert math.isfinite(m["test_ppl"]) and m["test_ppl"] < m["ptq_ppl"] * 1.2


@pytest.mark.slow  # a CLI start, ~25 s on the loaded 2 cores
def test_the_llm_sweep_preset_composes_the_recipe(tmp_path, baseline_cache):
    from helpers_cli import run_cli

    cfg = run_cli("qat-sweep", ["--cfg", "job", "sweep=llm"], tmp_path, baseline_cache).stdout
    for expected in ("name: llama_tiny", "name: python_text", "name: language_modeling", "optimizer: adamw",
                     "schedule: warmup_cosine", "grad_clip_norm: 1.0", "batches_per_epoch: 40", "task_weight: 0.0"):
        assert expected in cfg, expected


def test_a_transformers_class_at_target_is_built_from_its_config_and_loads_a_checkpoint(tmp_path):
    import torch
    import transformers

    from orchestrator.train.builders import load_pretrained, new_model
    from orchestrator.train.config import ModelSpec
    from orchestrator.zoo.python_text import python_text

    data = python_text(seq_len=16, modules=["abc", "getopt", "linecache"], docs=False, val_fraction=0.3,
                       test_fraction=0.3)
    spec = ModelSpec(name="llama", _target_="transformers.LlamaForCausalLM",
                     args={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 1})
    model = new_model(spec, data)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.vocab_size == 256 and model.config.hidden_size == 32  # vocab_size from the data
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_pretrained(spec, data, str(tmp_path / "w.pt"))
    ids = data.train[0]["input_ids"][None]
    assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


W2G32 = {"quant.param_bw": 2, "quant.param_block_size": 32, "quant.quantize_activations": False}


@pytest.mark.slow  # ~25 s on 2 shared cores (the tiny baseline is cached by the first test)
def test_a_tiny_llm_trial_with_lora_trains_only_adapters_and_exports_them_merged(tmp_path, baseline_cache):
    import torch

    cfg = trial_config(tmp_path, baseline_cache, **TINY, **W2G32, **{
        "qat.range_learning": True, "qat.learn_weight_encodings": True, "qat.encoding_lr": 1e-3,
        "qat.lora.rank": 4, "qat.lora.alpha": 8.0})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished"
    # 7 Linear layers of width 32 (q, k, v, o: 32x32, 32x16 x2, 32x32; gate, up: 64x32; down: 32x64) and
    # the head (256x32): r * (in + out) each
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64), (256, 32)]
    assert m["lora_params"] == 4 * sum(o + i for o, i in shapes)
    assert m["lora_params"] < m["trained_params"] < m["lora_params"] + 2000  # + the learned block scales
    assert m["test_ppl"] < m["ptq_ppl"]  # the adapters learned to undo some of W2's loss
    assert m["qdq_agree_top1"] == 1.0 and m["qdq_sqnr_db"] > 60  # the merged export is the trained model
    state = torch.load(m["export_pth"], weights_only=True)
    assert not [k for k in state if "lora" in k]
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.params["qat.lora.rank"] == "4"
    assert run.data.metrics["lora_params"] == m["lora_params"]


@pytest.mark.parametrize("overrides, message", [
    ({"qat.lora.rank": -1}, r"^qat\.lora\.rank=-1 is not allowed; allowed: an integer >= 0 \(0: off\)$"),
    ({"qat.lora.targets": []}, r"^qat\.lora\.targets=\[\] is not allowed; allowed: a non-empty list"),
    ({"qat.lora.alpha": 0}, r"^qat\.lora\.alpha=0 is not allowed; allowed: a finite number > 0$"),
])
def test_bad_lora_config_is_one_clear_error(overrides, message):
    from orchestrator.train.config import TrialConfig, TrialConfigError

    d = TrialConfig().to_dict()
    for key, value in overrides.items():
        d["qat"]["lora"][key.rpartition(".")[2]] = value
    with pytest.raises(TrialConfigError, match=message) as err:
        TrialConfig.from_dict(d)
    assert "\n" not in str(err.value)


def test_an_unknown_lora_target_is_one_clear_error_naming_the_key():
    import torch

    from orchestrator.quant import QuantConfig, QuantizationSimModel
    from orchestrator.train.adapters import attach_lora
    from orchestrator.train.config import QatSpec, TrialConfigError
    from orchestrator.zoo.hf_models import llama_tiny

    model = llama_tiny(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    sim = QuantizationSimModel(model, torch.zeros(2, 8, dtype=torch.long), QuantConfig(quantize_activations=False))
    qat = QatSpec()
    qat.lora.rank, qat.lora.targets = 4, ["*.self_attn.*", "*.attn_proj"]
    with pytest.raises(TrialConfigError, match=r"^qat\.lora\.targets pattern '\*\.attn_proj' matches no quantized "
                                               r"Linear layer; allowed: fnmatch patterns of their names: model\.layers"):
        attach_lora(qat, sim)


@pytest.mark.slow  # ~40 s each: 2 Ray Train gloo workers
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_llm_recipe_with_lora_on_two_workers_exports_the_merged_model(tmp_path, baseline_cache, ray_local,
                                                                          strategy):
    """DDP all-reduces the adapters' gradients; FSDP2 shards the adapters with their decoder layers
    (frozen base weights beside them). Either way every rank ends with the same encodings, and rank 0
    (gathering the shards under FSDP2) merges the adapters and exports: the export agrees with it in
    onnxruntime."""
    cfg = trial_config(tmp_path, baseline_cache, **{**TINY, **W2G32, "trainer.num_workers": 2,
                                                    "trainer.strategy": strategy, "qat.range_learning": True,
                                                    "qat.learn_weight_encodings": True, "qat.encoding_lr": 1e-3,
                                                    "qat.distill.enabled": True, "qat.lora.rank": 4})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["test_ppl"] < m["ptq_ppl"]
    assert m["lora_params"] == 3200  # as the single-worker trial above: counted before sharding
    digests = m["encoding_digests"].split(",")
    assert len(digests) == 2 and len(set(digests)) == 1
    assert m["qdq_agree_top1"] == 1.0 and m["qdq_sqnr_db"] > 60
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["qat.strategy"] == strategy and run.info.status == "FINISHED"


@pytest.mark.slow  # two 3-epoch trials of the tiny Llama, ~15 s
def test_a_lora_trial_resumes_from_its_checkpoint_to_the_same_merged_export(tmp_path, baseline_cache):
    """The adapters, their optimizer state and the learned block scales come back from the epoch-1
    checkpoint: the resumed trial ends on the uninterrupted one's export bit for bit."""
    import torch

    cfg = trial_config(tmp_path, baseline_cache, name="lora", **{**TINY, "qat.epochs": 3}, **W2G32, **{
        "qat.range_learning": True, "qat.learn_weight_encodings": True, "qat.encoding_lr": 1e-3,
        "qat.lora.rank": 4, "qat.lora.alpha": 8.0})
    full = run_trial(cfg)
    a = torch.load(full.metrics["export_pth"], weights_only=True)
    last = sorted((tmp_path / "lora" / "checkpoints").glob("epoch_*.pt"))[-1]
    assert last.name == "epoch_0002.pt"
    last.unlink()  # as if the process died right after the epoch-1 checkpoint
    resumed = run_trial(cfg)
    assert resumed.run_id == full.run_id and resumed.metrics["resumed_from_epoch"] == 1
    assert resumed.metrics["test_ppl"] == full.metrics["test_ppl"]
    assert resumed.metrics["lora_params"] == full.metrics["lora_params"]
    b = torch.load(resumed.metrics["export_pth"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
