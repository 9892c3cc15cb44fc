"""QatTrainer: QAT in a Hugging Face Trainer pipeline (issue 19). The example script through its real
command line, and the API directly on a tiny BERT (random weights, generated data, no download)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from orchestrator.integrations import QatTrainer
from orchestrator.quant import QuantConfig, export_agreement
from orchestrator.zoo.token_data import majority_tokens, pad_collate

REPO = Path(__file__).resolve().parents[2]
ENCODING_LR = 5e-2


def graph_tensor_names(onnx_path: str) -> set[str]:
    graph = onnx.load(onnx_path).graph
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def encoding_names(encodings_path: str) -> list[str]:
    doc = json.loads(Path(encodings_path).read_text())
    return [e["name"] for key in ("activation_encodings", "param_encodings") for e in doc[key]]


@pytest.mark.slow
def test_example_script_trains_evaluates_exports_and_checks(tmp_path):
    """``python examples/hf_trainer_qat.py --output-dir DIR``: FP32 with a plain Trainer, then W4A8
    QatTrainer (range learning): PTQ and QAT eval, export, onnxruntime agreement, float save."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "hf_trainer_qat.py"), "--output-dir", str(out)],
                          cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "onnxruntime vs simulation top-1 agreement" in proc.stdout, proc.stdout[-2000:]
    results = json.loads((out / "results.json").read_text())
    export = results["export"]
    for kind in ("pth", "onnx", "encodings"):
        assert Path(export[kind]).is_file(), export
    names = encoding_names(export["encodings"])
    missing = sorted(set(names) - graph_tensor_names(export["onnx"]))
    assert len(names) > 20 and not missing, f"encodings naming no tensor of the ONNX graph: {missing}"
    assert export["qdq_agree_top1"] == 1.0 and export["qdq_sqnr_db"] >= 30.0, export
    ptq, qat = results["ptq"], results["qat"]
    assert all(math.isfinite(v) for v in (ptq["ptq_loss"], qat["qat_loss"], results["fp32"]["fp32_loss"]))
    assert qat["qat_loss"] < ptq["ptq_loss"], (ptq, qat)  # measured 0.099 -> 0.060
    assert qat["qat_accuracy"] >= 90.0, qat  # FP32 98.4, PTQ 97.7, QAT 98.4 (4 classes: chance is 25)
    per_epoch = [e["eval_loss"] for e in results["log_history"] if "eval_loss" in e]
    assert len(per_epoch) == 2 and all(math.isfinite(v) for v in per_epoch), results["log_history"]
    assert any("qdq_sqnr_db" in e for e in results["log_history"])  # the agreement is in the Trainer's metrics
    _, info = BertForSequenceClassification.from_pretrained(out / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# ---------------------------------------------------------------------------- the API
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=4))


@pytest.fixture(scope="module")
def data():
    return majority_tokens(num_classes=4, vocab_size=64, train_size=128, val_size=64, test_size=8, seed=1)


def make_trainer(tmp: Path, data, **quant) -> QatTrainer:
    args = TrainingArguments(output_dir=str(tmp), max_steps=6, learning_rate=1e-3, weight_decay=0.01,
                             per_device_train_batch_size=16, per_device_eval_batch_size=32, save_strategy="no",
                             report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
    return QatTrainer(model=tiny_bert(), args=args, train_dataset=data.train, eval_dataset=data.val,
                      data_collator=pad_collate, **{"calibration_batches": 2, **quant})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A range-learning QatTrainer: the encodings' values before training, then trained 6 steps."""
    trainer = make_trainer(tmp_path_factory.mktemp("qat"), data,
                           quant_config=QuantConfig(range_learning=True), encoding_lr=ENCODING_LR)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p in
              set(trainer.sim.quantizer_parameters())}
    trainer.train()
    return trainer, before


def test_the_trainer_trains_the_calibrated_simulation(trained):
    trainer, _ = trained
    assert trainer.model is trainer.sim.model and trainer.sim.calibrated
    batch = next(iter(trainer.get_train_dataloader()))  # the columns the float model takes are still kept
    assert {"input_ids", "attention_mask", "labels"} <= set(batch), sorted(batch)
    trainer.model.eval()
    with torch.no_grad():  # the Trainer's batch dict, labels included, still gives the loss
        with_labels = trainer.model(**batch)
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(with_labels.loss, F.cross_entropy(logits, batch["labels"]))


def test_encodings_have_their_own_optimizer_group_and_are_learned(trained):
    trainer, before = trained
    encodings = trainer.sim.quantizer_parameters()
    groups = trainer.optimizer.param_groups
    own = [g for g in groups if any(p is encodings[0] for p in g["params"])]
    assert len(own) == 1 and len(own[0]["params"]) == len(encodings), [len(g["params"]) for g in groups]
    assert own[0]["weight_decay"] == 0.0 and own[0]["initial_lr"] == ENCODING_LR
    assert sum(len(g["params"]) for g in groups) == len([p for p in trainer.model.parameters() if p.requires_grad])
    after = dict(trainer.model.named_parameters())
    changed = [n for n, v in before.items() if not torch.equal(v, after[n].detach())]
    assert len(before) > 10 and len(changed) > len(before) // 2, f"{len(changed)} of {len(before)} encodings changed"
    assert any(n.endswith("log_scale") for n in changed), changed


def test_export_is_checked_in_onnxruntime_and_the_check_can_fail(trained, tmp_path):
    trainer, _ = trained
    result = trainer.export_quantized(str(tmp_path / "export"), prefix="bert")
    assert result["qdq_agree_top1"] == 1.0 and result["qdq_sqnr_db"] >= 30.0, result
    assert any(e.get("qdq_sqnr_db") == result["qdq_sqnr_db"] for e in trainer.state.log_history)
    assert not sorted(set(encoding_names(result["encodings"])) - graph_tensor_names(result["onnx"]))
    # the same check on an encodings file whose activation scales are 8x too large: it must see it
    doc = json.loads(Path(result["encodings"]).read_text())
    for entry in doc["activation_encodings"]:
        entry["scale"] = [8 * s for s in entry["scale"]]
    wrong = tmp_path / "wrong.encodings"
    wrong.write_text(json.dumps(doc))
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in [next(iter(trainer.get_eval_dataloader()))]]
    bad = export_agreement(trainer.sim, {"onnx": result["onnx"], "encodings": str(wrong)}, batches)
    assert bad.sqnr_db < result["qdq_sqnr_db"] - 10.0 and bad.max_abs > 0.0, bad
    # the rule a trial fails its export by (qat.qdq_min_sqnr_db, default 30 dB)
    good = export_agreement(trainer.sim, result, batches)
    assert good.problem(30.0) is None
    assert bad.problem(good.sqnr_db).startswith("onnxruntime's QDQ run of the export disagrees with the simulation: "
                                                 "output SQNR "), bad


def test_save_model_writes_the_float_model_from_pretrained_loads(trained, tmp_path):
    trainer, _ = trained
    trainer.save_model(str(tmp_path / "model"))
    model, info = BertForSequenceClassification.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = {k: v for k, v in next(iter(trainer.get_eval_dataloader())).items() if k != "labels"}
    trainer.sim.set_quantization_enabled(False)
    try:
        with torch.no_grad():
            expected = trainer.model.eval()(**batch).logits
            got = model.eval()(**batch).logits
    finally:
        trainer.sim.set_quantization_enabled(True)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_without_range_learning_no_encoding_is_trained(tmp_path, data):
    trainer = make_trainer(tmp_path, data, quant_config=QuantConfig(param_bw=4))
    trainer.create_optimizer()
    assert trainer.sim.quantizer_parameters() == []
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(trainer.model.parameters()))


@pytest.mark.parametrize("kwargs, message", [
    ({"calibration_batches": 0}, "calibration_batches=0 is not allowed; allowed: an integer >= 1"),
    ({"quant_config": QuantConfig(range_learning=True)}, "encoding_lr=None is not allowed with range_learning=True"),
    ({"encoding_lr": 1e-2}, "encoding_lr=0.01 is only used with range learning"),
    ({"quant_config": {"param_bw": 4}}, "quant_config={'param_bw': 4} is not allowed"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, data, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(tmp_path, data, **kwargs)


def test_a_causal_lm_trains_exports_and_saves(tmp_path):
    """GPT-2 (tied input/output embeddings; the loss computed inside the model from shifted labels)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from orchestrator.zoo.token_data import markov_text

    data = markov_text(vocab_size=64, train_size=64, val_size=32, test_size=8)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, learning_rate=1e-3, per_device_train_batch_size=16,
                             report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no")
    trainer = QatTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.val,
                         data_collator=pad_collate, quant_config=QuantConfig(range_learning=True), encoding_lr=1e-2)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert math.isfinite(before) and math.isfinite(after) and after < before - 0.05, (before, after)
    result = trainer.export_quantized(str(tmp_path / "export"))
    assert result["qdq_agree_top1"] == 1.0 and result["qdq_sqnr_db"] >= 30.0, result
    trainer.save_model(str(tmp_path / "model"))
    _, info = GPT2LMHeadModel.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
