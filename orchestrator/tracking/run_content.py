"""What a trial's MLflow run holds: which config keys are params, which are tags, its artifacts.

- **Params**: the keys that decide the result (model, data, bit widths, calibration, the QAT
  recipe, workers) plus every swept key, as the sweep wrote it (``quant=w4a4``). Settings
  that only apply to another mode are left out (``qat.momentum`` with Adam).
- **Tags**: paths and ids (output directory, checkpoint, trial id) and the labels the UI
  filters on (``qat.bits``, ``qat.mode``, ``qat.sweep_name``, ``qat.outcome``).
- **Metrics**, named ``<stage>_<metric>`` for every metric of the task (classification: ``acc``,
  ``top5``; language modelling: ``loss``, ``ppl``): per epoch ``train_loss`` (the task loss;
  ``train_distill_loss`` beside it when distilling), ``val_<metric>``, ``lr``, ``epoch_time_s``,
  ``samples_per_s``; once: ``fp32_<metric>``, ``ptq_<metric>``, ``val_samples``,
  ``test_samples``, ``startup_s`` (and ``worker_start_s``), ``test_<metric>``.
- **Artifacts**: ``config.json``; ``export/`` (``.pth``, ``.onnx``, ``.encodings`` and the
  same encodings as ``.encodings.json``, which the MLflow UI previews); ``summary.txt``
  (``sim.summary()``: every quantizer, where it sits, its encoding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..train.config import TrialConfig
from ..train.labels import bits_label, mode_label
from .mlflow_runs import FAILURE_REASON_TAG, KIND_TAG, MAX_PARAM_LENGTH, OUTCOME_TAG  # noqa: F401 (re-exported)

EPOCH_METRICS = ("train_loss", "train_distill_loss", "lr", "epoch_time_s", "samples_per_s")
FIRST_EPOCH_METRICS = ("startup_s", "worker_start_s", "compile_warmup_s")

_ALWAYS = ("model.name", "data.name", "task.name", "quant.param_bw", "quant.output_bw", "quant.quant_scheme",
           "quant.per_channel", "quant.fold_batchnorm", "qat.range_learning", "qat.optimizer", "qat.lr", "qat.epochs", "qat.batch_size",
           "qat.weight_decay", "qat.schedule", "qat.calibration_batches", "qat.distill.enabled", "qat.seed",
           "trainer.num_workers")


def epoch_metric_keys(task) -> tuple[str, ...]:
    """The metrics logged per epoch (MLflow step = epoch) for ``task``: the fixed ones plus
    ``val_<metric>`` for every metric of the task."""
    return EPOCH_METRICS + FIRST_EPOCH_METRICS + tuple(f"val_{m.name}" for m in task.metrics)


def _get(cfg: TrialConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def trial_params(cfg: TrialConfig, swept: dict[str, Any] | None = None) -> dict[str, str]:
    """The run's params: the main result-deciding keys of ``cfg``, every other one not at its
    default (``changed_decisive_keys``), plus the swept ``key=value`` pairs."""
    keys = list(_ALWAYS)
    if cfg.quant.quant_scheme == "percentile":
        keys.append("quant.percentile")
    if cfg.qat.optimizer == "sgd":
        keys.append("qat.momentum")
    if cfg.qat.range_learning:
        keys += ["qat.encoding_lr", "qat.learn_weight_encodings", "qat.lsq_grad_scaling"]
    if cfg.qat.schedule == "step":
        keys += ["qat.lr_step_epochs", "qat.lr_gamma"]
    if cfg.qat.distill.enabled:
        keys += ["qat.distill.temperature", "qat.distill.weight", "qat.distill.task_weight"]
    if cfg.qat.init:  # PTQ steps before QAT, and the settings of those that run
        keys.append("qat.init")
        keys += [f"qat.ptq.{k}" for k in ("adaround_iterations", "adaround_lr", "adaround_reg",
                                                   "adaround_quantized_inputs") if "adaround" in cfg.qat.init]
        keys += ["qat.ptq.seqmse_candidates"] if "seqmse" in cfg.qat.init else []
    if cfg.qat.schedule in ("warmup_cosine",):
        keys.append("qat.warmup_steps")
    # everything else that decides the result (formats, blocks, clipping, _target_s, args, ...) is a
    # param where it is off its default: changed_decisive_keys, below
    params = {key: _text(_get(cfg, key)) for key in keys}
    for key, value in changed_decisive_keys(cfg).items():
        if not _PARAM_KEY.fullmatch(key):  # a pattern key (quant.overrides.*.mlp.*...): the whole mapping
            key = ".".join(key.split(".")[:2])
            value = _get(cfg, key)
        params.setdefault(key, _text(value))
    for key, value in (swept or {}).items():
        params[key.lstrip("+~")] = _text(value)
    return params


def changed_decisive_keys(cfg: TrialConfig) -> dict[str, Any]:
    """Every key of the run's identity (``train/identity.py``: what decides its result) whose value
    is not the schema's default: the formats, block sizes, loop, accumulation, autocast, overrides,
    a model's or dataset's ``args`` ... (the checkpoint's digest and the world size stay out: the
    checkpoint is a tag, the workers a param)."""
    from ..train.identity import decisive_config

    defaults = decisive_config(TrialConfig())
    return {k: v for k, v in decisive_config(cfg).items()
            if k not in ("model.checkpoint", "trainer.world_size") and defaults.get(k, _MISSING) != v}


_MISSING = object()
_PARAM_KEY = re.compile(r"[\w\-. /]+")  # what MLflow accepts as a param name


def trial_tags(cfg: TrialConfig, launcher: str) -> dict[str, str]:
    """Labels and paths of the run. ``launcher``: ``in-process``, ``tune-actor`` or ``ray-train``."""
    tags = {KIND_TAG: "trial", "qat.mode": mode_label(cfg), "qat.bits": bits_label(cfg),
            "qat.param_bw": str(cfg.quant.param_bw), "qat.output_bw": str(cfg.quant.output_bw),
            "qat.model": cfg.model.name, "qat.data": cfg.data.name, "qat.task": cfg.task.name,
            "qat.launcher": launcher, "qat.output_dir": cfg.output_dir}
    if cfg.model.checkpoint:
        tags["qat.checkpoint"] = str(cfg.model.checkpoint)
    if cfg.trainer.storage_path:
        tags["qat.storage_path"] = str(cfg.trainer.storage_path)
    return tags


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)[:MAX_PARAM_LENGTH]
    return str(value)[:MAX_PARAM_LENGTH]


def log_export(tracker, export_dir: str | Path, prefix: str, summary: str) -> None:
    """Log a trial's export directory, its encodings again as JSON, and the sim summary.

    ``tracker``: a ``RunLogger`` or ``BackgroundRunLogger`` (the calls are queued in order)."""
    export_dir = Path(export_dir)
    tracker.log_artifacts(export_dir, "export")
    encodings = export_dir / f"{prefix}.encodings"
    if encodings.is_file():
        tracker.log_dict(json.loads(encodings.read_text(encoding="utf-8")), f"export/{prefix}.encodings.json")
    tracker.log_text(summary, "summary.txt")
