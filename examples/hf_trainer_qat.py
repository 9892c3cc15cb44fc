"""QAT in a Hugging Face Trainer pipeline: the same TrainingArguments, data and metrics, ``Trainer``
replaced by ``QatTrainer``.

    python examples/hf_trainer_qat.py --output-dir /tmp/hf-qat

A tiny BERT (random weights, built from a config: no download) first learns a generated
sequence-classification task (which marker token occurs most often; ``orchestrator.zoo``'s
``majority_tokens``) with a plain ``Trainer``: this stands for your pretrained FP32 model. Then
``QatTrainer`` builds its W4A8 simulation, calibrates it on 4 train batches, evaluates it (PTQ),
fine-tunes it with range learning, evaluates it again and exports it with its encodings, checked in
onnxruntime. ``<output-dir>/results.json`` holds every number; ``<output-dir>/model`` the trained
float weights (``from_pretrained``), ``<output-dir>/export`` the ``.pth``/``.onnx``/``.encodings``.
About 20-30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from orchestrator.integrations import QatTrainer
from orchestrator.quant import QuantConfig, QuantConfigError
from orchestrator.zoo.token_data import majority_tokens, pad_collate

NUM_CLASSES = 4
VOCAB = 64


def accuracy(prediction) -> dict[str, float]:
    """``compute_metrics``: percent of samples whose argmax is the label."""
    return {"accuracy": 100.0 * float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, num_labels=NUM_CLASSES)
    return BertForSequenceClassification(config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="where results.json, model/ and export/ go")
    parser.add_argument("--fp32-epochs", type=float, default=6, help="epochs of the plain Trainer (the 'pretrained' model)")
    parser.add_argument("--qat-epochs", type=float, default=2, help="epochs of QatTrainer")
    parser.add_argument("--param-bw", type=int, default=4, help="weight bit width")
    parser.add_argument("--output-bw", type=int, default=8, help="activation bit width")
    parser.add_argument("--no-range-learning", action="store_true", help="keep the calibrated activation encodings")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    range_learning = not opts.no_range_learning
    try:  # a bad bit width is one line, before anything trains
        quant_config = QuantConfig(param_bw=opts.param_bw, output_bw=opts.output_bw, range_learning=range_learning)
    except QuantConfigError as exc:
        parser.error(str(exc))
    out = Path(opts.output_dir)
    started = time.perf_counter()

    data = majority_tokens(num_classes=NUM_CLASSES, vocab_size=VOCAB, min_length=12, max_length=32,
                           train_size=opts.train_size, val_size=256, test_size=256, seed=opts.seed)
    # your pipeline: arguments, data, collator, metrics
    args = TrainingArguments(output_dir=str(out / "fp32"), num_train_epochs=opts.fp32_epochs, learning_rate=2e-3,
                             per_device_train_batch_size=32, per_device_eval_batch_size=64, weight_decay=0.01,
                             warmup_steps=10, eval_strategy="no", save_strategy="no", logging_strategy="epoch",
                             report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                             seed=opts.seed)
    common = {"train_dataset": data.train, "eval_dataset": data.val, "data_collator": pad_collate,
              "compute_metrics": accuracy}
    model = tiny_bert(opts.seed)
    fp32_trainer = Trainer(model=model, args=args, **common)
    fp32_trainer.train()
    fp32 = fp32_trainer.evaluate(metric_key_prefix="fp32")

    # QAT: the same arguments (own output dir, fewer epochs, the quantized model evaluated every epoch)
    qat_args = dataclasses.replace(args, output_dir=str(out / "qat"), num_train_epochs=opts.qat_epochs,
                                   learning_rate=5e-4, eval_strategy="epoch")
    trainer = QatTrainer(model=model, args=qat_args, **common, quant_config=quant_config, calibration_batches=4,
                         encoding_lr=1e-2 if range_learning else None)
    ptq = trainer.evaluate(metric_key_prefix="ptq")
    trainer.train()
    qat = trainer.evaluate(metric_key_prefix="qat")
    export = trainer.export_quantized(str(out / "export"), prefix=f"bert_w{opts.param_bw}a{opts.output_bw}")
    trainer.save_model(str(out / "model"))

    results = {"fp32": fp32, "ptq": ptq, "qat": qat, "export": export, "log_history": trainer.state.log_history,
               "wall_s": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"FP32 accuracy {fp32['fp32_accuracy']:.1f}%  PTQ (W{opts.param_bw}A{opts.output_bw}) "
          f"{ptq['ptq_accuracy']:.1f}%  QAT {qat['qat_accuracy']:.1f}% (eval loss {ptq['ptq_loss']:.4f} -> "
          f"{qat['qat_loss']:.4f})")
    print(f"export {export['encodings']}: onnxruntime vs simulation top-1 agreement "
          f"{export['qdq_top1_agreement']:.3f}, SQNR {export['qdq_sqnr_db']:.1f} dB  ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
