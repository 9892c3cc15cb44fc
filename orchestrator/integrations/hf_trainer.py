"""QAT inside a user's Hugging Face ``Trainer`` pipeline: replace ``Trainer`` with ``QatTrainer``.

    trainer = QatTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                         data_collator=collate, compute_metrics=metrics,
                         quant_config=QuantConfig(param_bw=4, range_learning=True), encoding_lr=1e-2)
    trainer.evaluate(metric_key_prefix="ptq")  # the calibrated simulation, before training
    trainer.train()                            # the user's TrainingArguments, loop, callbacks, logging
    trainer.evaluate()                         # the quantized model after QAT
    trainer.export_quantized("export")         # .pth/.onnx/.encodings, checked in onnxruntime

What happens, in AIMET's order (DESIGN.md "What the product does"):

1. at construction, after ``Trainer.__init__`` (the model already on ``args.device``): the
   ``QuantizationSimModel`` is built from the Trainer's model with the first batch of its train
   dataloader (label keys, ``trainer.label_names``, removed) as dummy input;
2. it is calibrated on the first ``calibration_batches`` batches of that dataloader;
3. ``trainer.model`` becomes ``sim.model`` (same class, same call convention: the Trainer's batch
   dicts with ``labels`` still return ``.loss``), so the optimizer, the wrapping (DDP, compile) and
   every later step see the simulation. The optimizer is the one ``TrainingArguments`` choose,
   with the trainable encodings (range learning) moved to their own group
   (``sim.encoding_param_group``: ``encoding_lr``, no weight decay) under the same LR schedule;
4. ``evaluate`` is the Trainer's own, on the quantized model;
5. ``export_quantized`` writes the export and reports onnxruntime's agreement with the simulation
   (``quant.export_agreement``) in the Trainer's metrics.

Why a ``Trainer`` subclass and not a ``TrainerCallback``: a callback's ``on_train_begin`` runs
inside ``train()`` after the optimizer was created over the float model's parameters and the model
was wrapped, and a callback cannot replace ``trainer.model``. The swap has to happen before both,
and the optimizer has to give the encodings their own group: a subclass does this with a few
overrides and leaves the rest of the Trainer as the user configured it.

Several processes (``torchrun``/``accelerate launch``): each rank calibrates on its own shard of the
train dataloader; DDP broadcasts rank 0's parameters and buffers (the encodings among them) when it
wraps the model, so training starts from rank 0's encodings on every rank. Only the main process
exports. (Not tested here: the CI machine has one process and no GPU.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from transformers import Trainer

from ..quant import QuantConfig, QuantizationSimModel, export_agreement


def _run_batches(model, batches: list[dict[str, Any]]) -> None:
    """``compute_encodings``' forward pass: the model on each batch of keyword tensors."""
    for batch in batches:
        model(**batch)


class QatTrainer(Trainer):
    """A ``transformers.Trainer`` whose model is the calibrated quantization simulation of the model
    it was given (see the module docstring). Every ``Trainer`` argument works as before, except
    ``model_init`` (it would replace the simulation) and ``optimizers=(optimizer, ...)`` (built over
    the float model's parameters: choose it with ``TrainingArguments.optim`` or
    ``optimizer_cls_and_kwargs``).

    Args (keyword only, besides the Trainer's):
        quant_config: how the model is quantized (``QuantConfig()``: W8A8 per-channel weights).
        calibration_batches: how many batches of the train dataloader calibrate the encodings (>= 1);
            fewer when the dataloader has fewer.
        encoding_lr: learning rate of the trained encodings, needed with ``range_learning`` (they are
            trained in log-scale: Adam moves a scale by about ``encoding_lr`` relative per step, so a
            weights' learning rate such as 5e-5 would leave them where calibration put them; ``qat-train``
            uses ``qat.encoding_lr``).

    Attributes:
        sim: the ``QuantizationSimModel``; ``trainer.model is trainer.sim.model``.
    """

    def __init__(self, *args: Any, quant_config: QuantConfig | None = None, calibration_batches: int = 4,
                 encoding_lr: float | None = None, **kwargs: Any) -> None:
        quant_config = QuantConfig() if quant_config is None else quant_config
        if not isinstance(quant_config, QuantConfig):
            raise ValueError(f"quant_config={quant_config!r} is not allowed; allowed: an "
                             "orchestrator.quant.QuantConfig")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} is not allowed; allowed: an integer >= 1")
        _check_encoding_lr(encoding_lr, quant_config.range_learning)
        self._float_save = False  # save_model's own calls write the float model (see save_model)
        super().__init__(*args, **kwargs)
        if self.model_init is not None:
            raise ValueError("model_init is not supported by QatTrainer: it would replace the quantization "
                             "simulation; allowed: model=<your pretrained model>")
        if self.optimizer is not None:
            raise ValueError("optimizers=(optimizer, ...) is not supported by QatTrainer: it was built over the float "
                             "model's parameters; allowed: TrainingArguments.optim or optimizer_cls_and_kwargs")
        self.encoding_lr = encoding_lr
        # The columns the Trainer keeps are read from the float model's forward signature, now:
        # sim.model's forward takes (*args, **kwargs) and would not name them.
        self._set_signature_columns_if_needed()
        batches = self._calibration_batches(calibration_batches)
        self.sim = QuantizationSimModel(self.model, batches[0], quant_config)
        self.sim.compute_encodings(_run_batches, batches)
        self.model = self.model_wrapped = self.sim.model

    # ------------------------------------------------------------------ build and calibrate
    def _model_inputs(self, batch: Any) -> dict[str, Any]:
        """A dataloader batch on the Trainer's device, without its label keys: what the model is called with."""
        if not isinstance(batch, Mapping):
            raise ValueError(f"QatTrainer needs batches that are dicts of model inputs (the Trainer calls "
                             f"model(**batch)); the data collator returned a {type(batch).__name__}")
        return {k: v for k, v in self._prepare_inputs(batch).items() if k not in self.label_names}

    def _calibration_batches(self, count: int) -> list[dict[str, Any]]:
        if self.train_dataset is None:
            raise ValueError("train_dataset=None is not allowed for QatTrainer: the quantization simulation is "
                             "built and calibrated on the first batches of the train dataloader")
        batches = []
        for batch in self.get_train_dataloader():
            batches.append(self._model_inputs(batch))
            if len(batches) == count:
                break
        if not batches:
            raise ValueError("train_dataset has no batch to calibrate on; allowed: a dataset with at least one sample")
        return batches

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimizer (``TrainingArguments.optim``, weight decay as the Trainer decides),
        the trainable encodings taken out of its groups into their own (``encoding_lr``, no decay)."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(*args, **kwargs)
        group = self.sim.encoding_param_group(self.encoding_lr) if self.encoding_lr is not None else None
        if group is not None:
            encodings = {id(p) for p in group["params"]}
            for g in optimizer.param_groups:
                g["params"] = [p for p in g["params"] if id(p) not in encodings]
            optimizer.add_param_group(group)
            self.sim.watch_encodings(optimizer)  # a learned scale at its floor is warned about by name
        return optimizer

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``trainer.save_model(dir)`` writes the *float* model with the trained weights
        (``sim.float_state_dict()``: no quantizer keys, BatchNorms unfolded), which the original class's
        ``from_pretrained`` loads; the encodings come with ``export_quantized``. Checkpoints (the
        Trainer's internal calls) keep ``sim.model``'s whole state, weights and encodings, so
        ``resume_from_checkpoint`` and ``load_best_model_at_end`` restore the simulation."""
        self._float_save = not _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._float_save = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self._float_save and state_dict is None:
            state_dict = self.sim.float_state_dict()
        super()._save(output_dir, state_dict)

    # ------------------------------------------------------------------ export
    def export_quantized(self, output_dir: str, prefix: str = "model", check_batches: int = 2) -> dict[str, Any]:
        """Write ``{prefix}.pth``, ``{prefix}.onnx`` and ``{prefix}.encodings`` under ``output_dir``
        (``sim.export``, traced with the first calibration batch) and check them: onnxruntime with the
        encodings applied against ``sim.model`` on the first ``check_batches`` batches of the eval
        dataloader (the train dataloader without an ``eval_dataset``). The agreement
        (``qdq_agree_top1`` in [0, 1], ``qdq_sqnr_db``, ``qdq_max_abs_diff``) is logged to the
        Trainer's metrics (``trainer.state.log_history``, its reporting integrations) and returned
        with the paths (``pth``, ``onnx``, ``encodings``). Only the main process exports; the others
        return ``{}``."""
        if isinstance(check_batches, bool) or not isinstance(check_batches, int) or check_batches < 1:
            raise ValueError(f"check_batches={check_batches!r} is not allowed; allowed: an integer >= 1")
        if not self.is_world_process_zero():
            return {}
        paths = self.sim.export(str(output_dir), prefix)
        batches = []
        for batch in self._check_loader():
            batches.append(self._model_inputs(batch))
            if len(batches) == check_batches:
                break
        metrics = export_agreement(self.sim, paths, batches).metrics()
        self.log(metrics)
        return {**paths, **metrics}

    def _check_loader(self):
        data = self.eval_dataset
        if isinstance(data, dict):  # several named eval sets: the first
            data = next(iter(data.values()), None)
        return self.get_eval_dataloader(data) if data is not None else self.get_train_dataloader()


def _check_encoding_lr(encoding_lr: Any, range_learning: bool) -> None:
    if not range_learning:
        if encoding_lr is not None:
            raise ValueError(f"encoding_lr={encoding_lr!r} is only used with range learning; allowed: leave it out, "
                             "or QuantConfig(range_learning=True)")
        return
    if isinstance(encoding_lr, bool) or not isinstance(encoding_lr, (int, float)) or not (
            math.isfinite(encoding_lr) and encoding_lr > 0):
        raise ValueError(f"encoding_lr={encoding_lr!r} is not allowed with range_learning=True; allowed: a positive "
                         "number such as 1e-2 (the encodings' own learning rate)")
