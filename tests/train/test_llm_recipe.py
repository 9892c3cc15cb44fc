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


@pytest.mark.slow  # ~25 s each on 2 shared cores (the first trains the tiny baseline)
@pytest.mark.parametrize("preset", [
    {"quant.param_bw": 2, "quant.param_block_size": 32, "quant.quantize_activations": False},  # quant=w2g32
    # quant=w4g32a4, at the export-check threshold of sweep=llm: int4 per-token simulations are
    # sensitive to last-bit float differences (tests/quant/test_per_token_int4_export.py); 28.4 dB here
    {"quant.param_bw": 4, "quant.param_block_size": 32, "quant.output_bw": 4,
     "quant.output_granularity": "per_token", "qat.qdq_min_sqnr_db": 15.0},
], ids=["w2g32", "w4g32a4"])
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
