"""TrialConfig: one QAT trial, as plain validated dataclasses.

These classes are also the Hydra schemas of ``conf/`` (registered by the CLI layer), but this
module imports no Hydra: configs cross process boundaries as plain dicts
(``TrialConfig.to_dict`` / ``TrialConfig.from_dict``). Every validation error names the key,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..quant import QuantConfig, QuantConfigError
from ..quant.ptq import STEPS, AdaRoundParams, SeqMseParams
from ..tasks.registry import TASKS
from ..zoo.registry import DATASETS, MODELS, RegistryError, check_name
from .strategies import STRATEGIES

AUTOCAST_DTYPES = {"bf16": "bfloat16"}  # qat.autocast -> torch dtype name


class TrialConfigError(ValueError):
    """A trial configuration value outside what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise TrialConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


# A learning rate above this is a typo, not a recipe (Adam's steps are ~lr; SGD's lr * gradient).
MAX_LR = 10.0


@dataclass
class ModelSpec:
    """The pretrained model. Built-in ``name`` or a user class at ``_target_`` (dotted path).

    ``checkpoint``: a ``state_dict`` file for the model; when empty the FP32 baseline is
    trained once with the ``pretrain_*`` recipe and cached under ``cache_dir``.
    """

    name: str = "mnist1d_cnn"
    _target_: Optional[str] = None
    args: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    pretrain_epochs: int = 150
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 64
    pretrain_weight_decay: float = 0.0
    cache_dir: Optional[str] = None

    def validate(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), "model.name", self.name, "a non-empty name")
        _require(_is_int(self.pretrain_epochs) and self.pretrain_epochs >= 1, "model.pretrain_epochs",
                 self.pretrain_epochs, "an integer >= 1")
        _require(_is_finite(self.pretrain_lr) and self.pretrain_lr > 0, "model.pretrain_lr", self.pretrain_lr, "a number > 0")
        _require(_is_int(self.pretrain_batch_size) and self.pretrain_batch_size >= 1, "model.pretrain_batch_size",
                 self.pretrain_batch_size, "an integer >= 1")
        _require(_is_finite(self.pretrain_weight_decay) and self.pretrain_weight_decay >= 0,
                 "model.pretrain_weight_decay", self.pretrain_weight_decay, "a number >= 0")


@dataclass
class DataSpec:
    """The dataset: built-in ``name`` (mnist1d, digits, synthetic, majority_tokens, markov_text) or
    a builder at ``_target_``, called with ``args``, returning ``orchestrator.zoo.datasets.DataSplits``
    (train/val/test ``Dataset``s, map-style or iterable, and an optional ``collate_fn``).
    ``loader_workers``: ``DataLoader`` worker processes per rank (0: load in the training process).
    """

    name: str = "mnist1d"
    _target_: Optional[str] = None
    args: dict[str, Any] = field(default_factory=dict)
    loader_workers: int = 0

    def validate(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), "data.name", self.name, "a non-empty name")
        _require(_is_int(self.loader_workers) and self.loader_workers >= 0, "data.loader_workers",
                 self.loader_workers, "an integer >= 0")


@dataclass
class TaskSpec:
    """What is learned: built-in ``name`` (classification, language_modeling) or a ``Task`` class at
    ``_target_`` (``orchestrator.tasks.Task``), constructed with ``args``. The task owns the loss,
    the metrics (logged as ``fp32_<m>``, ``ptq_<m>``, ``val_<m>``, ``test_<m>``) and the batch layout."""

    name: str = "classification"
    _target_: Optional[str] = None
    args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), "task.name", self.name, "a non-empty name")


@dataclass
class MixedSpec:
    """Mixed precision from per-quantizer sensitivity (``orchestrator/quant/ptq/sensitivity.py``):
    after a first calibration, the output SQNR with each quantizer alone on ranks them; then the
    ``keep_top_k`` most sensitive quantizers (weights or activations), or the most sensitive
    weights for as long as the average weight bit width stays within ``budget``, are kept at
    ``high`` bits, and the simulation is built again with those overrides. Off when both are null."""

    keep_top_k: Optional[int] = None
    budget: Optional[float] = None
    high: int = 8

    @property
    def enabled(self) -> bool:
        return self.keep_top_k is not None or self.budget is not None

    def validate(self) -> None:
        _require(self.keep_top_k is None or self.budget is None, "quant.mixed.budget", self.budget,
                 "null when quant.mixed.keep_top_k is set (one of the two)")
        _require(self.keep_top_k is None or (_is_int(self.keep_top_k) and self.keep_top_k >= 1),
                 "quant.mixed.keep_top_k", self.keep_top_k, "null or an integer >= 1")
        _require(self.budget is None or (_is_finite(self.budget) and self.budget >= 2), "quant.mixed.budget",
                 self.budget, "null or an average weight bit width >= 2")
        _require(_is_int(self.high) and 2 <= self.high <= 16, "quant.mixed.high", self.high, "an integer from 2 to 16")


@dataclass
class QuantSpec:
    """Bit widths, formats, granularities and calibration: the fields of ``QuantConfig`` that describe
    the target (``param_format``/``output_format``, ``param_block_size``, ``output_granularity``,
    ``quantize_activations``, ``activation_sites``, ``param_quant_scheme``; ``overrides`` by quantizer-name pattern, e.g.
    ``{"classifier*": {"enabled": false}, "*.attn.*": {"format": "float8_e4m3fn"}}``: see
    ``QuantConfig``); ``mixed``: mixed precision chosen from sensitivity."""

    # the core's own defaults (QuantConfig), written once there
    param_bw: int = QuantConfig.param_bw
    output_bw: int = QuantConfig.output_bw
    quant_scheme: str = QuantConfig.quant_scheme
    param_quant_scheme: str = QuantConfig.param_quant_scheme
    percentile: float = QuantConfig.percentile
    per_channel: bool = QuantConfig.per_channel
    fold_batchnorm: bool = QuantConfig.fold_batchnorm
    leaf_modules: list[str] = field(default_factory=list)
    param_format: str = QuantConfig.param_format
    output_format: str = QuantConfig.output_format
    param_block_size: int = QuantConfig.param_block_size
    output_granularity: str = QuantConfig.output_granularity
    quantize_activations: bool = QuantConfig.quantize_activations
    activation_sites: str = QuantConfig.activation_sites
    overrides: dict[str, Any] = field(default_factory=dict)
    mixed: MixedSpec = field(default_factory=MixedSpec)

    def validate(self) -> None:
        self.mixed.validate()  # the rest is checked through QuantConfig in TrialConfig.validate


@dataclass
class DistillSpec:
    """Knowledge distillation from the FP32 model (the teacher, run without gradients on every
    rank): loss = ``task_weight`` * task loss + ``weight`` * ``T^2 KL(p_teacher || p_student)`` at
    temperature ``T`` = ``temperature`` (Hinton et al. 2015; ``tasks/base.py``)."""

    enabled: bool = False
    temperature: float = 2.0
    weight: float = 0.5
    task_weight: float = 0.5

    def validate(self) -> None:
        _require(isinstance(self.enabled, bool), "qat.distill.enabled", self.enabled, "true or false")
        _require(_is_finite(self.temperature) and self.temperature > 0, "qat.distill.temperature", self.temperature,
                 "a finite number > 0")
        _require(_is_finite(self.weight) and self.weight >= 0, "qat.distill.weight", self.weight,
                 "a finite number >= 0")
        _require(_is_finite(self.task_weight) and self.task_weight >= 0, "qat.distill.task_weight",
                 self.task_weight, "a finite number >= 0")
        _require(not self.enabled or self.weight + self.task_weight > 0, "qat.distill.weight", self.weight,
                 "weight + task_weight > 0")


@dataclass
class PtqSpec:
    """Settings of the PTQ steps of ``qat.init`` (``orchestrator/quant/ptq``). ``num_batches``:
    how many of the ``qat.calibration_batches`` AdaRound and SeqMSE learn from (null: all).
    AdaRound: ``adaround_iterations`` Adam steps per layer at ``adaround_lr`` on
    ``adaround_batch_size`` samples each, rounding regulariser weight ``adaround_reg``, each layer
    on its inputs in the quantized model (``adaround_quantized_inputs``) or the float model's. SeqMSE:
    ``seqmse_candidates`` clipping ratios searched per output channel."""

    num_batches: Optional[int] = None
    adaround_iterations: int = AdaRoundParams.iterations
    adaround_lr: float = AdaRoundParams.lr
    adaround_reg: float = AdaRoundParams.reg
    adaround_batch_size: int = AdaRoundParams.batch_size
    adaround_quantized_inputs: bool = AdaRoundParams.quantized_inputs
    seqmse_candidates: int = SeqMseParams.candidates

    def validate(self) -> None:
        _require(self.num_batches is None or (_is_int(self.num_batches) and self.num_batches >= 1), "qat.ptq.num_batches",
                 self.num_batches, "null or an integer >= 1")
        for key in ("adaround_iterations", "adaround_batch_size", "seqmse_candidates"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 1, f"qat.ptq.{key}", value, "an integer >= 1")
        _require(_is_finite(self.adaround_lr) and 0 < self.adaround_lr <= MAX_LR, "qat.ptq.adaround_lr",
                 self.adaround_lr, f"a finite number in (0, {MAX_LR:g}]")
        _require(isinstance(self.adaround_quantized_inputs, bool), "qat.ptq.adaround_quantized_inputs",
                 self.adaround_quantized_inputs, "true or false")
        _require(_is_finite(self.adaround_reg) and self.adaround_reg >= 0, "qat.ptq.adaround_reg", self.adaround_reg,
                 "a finite number >= 0")


@dataclass
class LoraSpec:
    """QAT with absorbable LoRA adapters on the frozen base (``orchestrator/quant/lora.py``).

    ``rank`` 0: off (every weight trains). ``rank`` r >= 1: every quantized ``nn.Linear`` whose
    module name matches a pattern of ``targets`` (``fnmatch``: ``*.mlp.*``, ``*q_proj``; default
    ``*``, every one whose weight is not tied) gets ``A [r, in]`` (Kaiming-uniform, seeded by
    ``qat.seed``) and ``B [out, r]`` (zeros); its weight quantizer sees ``W + (alpha / r) B @ A``.
    Everything else (weights, biases, norms, embeddings) is frozen; the adapters train at
    ``qat.lr`` with ``qat.weight_decay``, learned encodings at ``qat.encoding_lr``. The export
    merges the adapters into the weights (the same outputs; no adapter in the ONNX graph).
    """

    rank: int = 0
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["*"])

    def validate(self) -> None:
        _require(_is_int(self.rank) and self.rank >= 0, "qat.lora.rank", self.rank, "an integer >= 0 (0: off)")
        _require(_is_finite(self.alpha) and self.alpha > 0, "qat.lora.alpha", self.alpha, "a finite number > 0")
        _require(isinstance(self.targets, (list, tuple)) and len(self.targets) > 0
                 and all(isinstance(t, str) and t for t in self.targets), "qat.lora.targets", self.targets,
                 "a non-empty list of module-name patterns (fnmatch), e.g. ['*'] or ['*.mlp.*']")


def check_init(steps: Any) -> None:
    """``qat.init``: a list of distinct PTQ step names, the steps that go before activation
    calibration (``cle``) first."""
    allowed = f"a list of distinct names from {', '.join(STEPS)}, e.g. [cle,adaround]"
    _require(isinstance(steps, (list, tuple)) and all(isinstance(s, str) for s in steps), "qat.init", steps, allowed)
    for name in steps:
        _require(name in STEPS, "qat.init", list(steps), allowed + f" ({name!r} is not one)")
    _require(len(set(steps)) == len(steps), "qat.init", list(steps), allowed)
    before = [STEPS[s].before_calibration for s in steps]
    _require(before == sorted(before, reverse=True), "qat.init", list(steps),
             "the steps that change weights before calibration (cle) ahead of adaround/seqmse")


@dataclass
class QatSpec:
    """The QAT fine-tuning: mode, optimizer, learning-rate schedule, batch sizes, distillation.

    ``optimizer``: a preset name (``sgd`` with ``momentum``, ``adam``, ``adamw``) or a ``_target_`` partial,
    ``{_target_: torch.optim.AdamW, betas: [0.9, 0.95]}`` (any ``torch.optim`` class or a user's, called with
    the parameter groups and the other keys; ``train/optim.py``).
    ``schedule``: a preset name, ``cosine`` (anneals ``lr`` towards 0 over ``epochs``, stepped per epoch),
    ``step`` (divides it by ``lr_gamma`` every ``lr_step_epochs`` epochs), ``constant``, ``warmup_cosine``
    (linear warmup over ``warmup_steps`` optimizer steps, then cosine to 0; stepped per optimizer step),
    ``onecycle`` (``torch.optim.lr_scheduler.OneCycleLR`` peaking at ``lr``, per optimizer step); or a
    ``_target_`` partial called with the optimizer and the other keys, plus ``total_steps`` when it takes
    that argument; its ``interval`` key (``epoch`` or ``step``, default ``epoch``) says when it steps.
    ``loop``: the training epoch, the dotted path of a function or a ``_target_`` partial, called as
    ``fn(model, loader, optimizer, ctx, **other keys)`` and returning an ``EpochResult``
    (``train/loops.py``; ``ctx`` is a ``LoopContext``).
    ``accumulation_steps``: optimizer steps every that many batches, on the sample-weighted mean gradient.
    ``autocast``: null (float32) or ``bf16`` (CPU and GPU): mixed precision for the forward and loss.
    ``batch_size`` is the global batch per forward, split evenly across workers (each gets
    ``batch_size // num_workers``); an optimizer step sees ``batch_size * accumulation_steps`` samples.
    ``batches_per_epoch``: an epoch trains on the first this many batches of its shuffled order (a
    different draw every epoch; the schedule counts these steps); null: the whole training split.
    QAT of a model pretrained on a large split fine-tunes on a part of it, as LLM recipes do.
    ``encoding_lr``: learning rate of the trained encodings (range learning), in their own
    optimizer group without weight decay, stepped down with ``lr``. Scales are learned as
    ``log(scale)``, so Adam moves a scale by about ``encoding_lr`` *relative* per step (0.01: 1%).
    ``lora``: QAT with LoRA adapters on the frozen quantized base (``LoraSpec``; rank 0: off).
    ``init``: PTQ steps run in order on the calibration data before fine-tuning (``cle``,
    ``adaround``, ``seqmse``; settings under ``ptq``); the trial logs ``ptq_after_<step>_<metric>``
    and ``ptq_<step>_s`` for each, ``ptq_plain_<metric>`` for calibration alone.
    ``bn_reestimate_batches``: with ``quant.fold_batchnorm=false``, after fine-tuning re-estimate
    the BatchNorm statistics on this many training batches with the quantized model, then fold
    them into the weights (and weight encodings) before the test and the export (0: off).
    ``restart``: start this run over even though its outputs hold another config or an earlier
    result; the old outputs are moved aside (``train/identity.py``), nothing is deleted.
    ``qdq_check_batches``: after the export, rank 0 runs the exported files in onnxruntime (QDQ) on
    the first this many test batches (at most 64 samples each) against the simulation and logs
    ``qdq_agree_top1``, ``qdq_sqnr_db`` and ``qdq_max_abs_diff`` (0: no check). ``qdq_min_sqnr_db``:
    an export whose output SQNR against the simulation is lower fails the trial (dB).
    """

    range_learning: bool = QuantConfig.range_learning  # the core's defaults, written once there
    learn_weight_encodings: bool = QuantConfig.learn_weight_encodings
    lsq_grad_scaling: bool = QuantConfig.lsq_grad_scaling
    optimizer: Any = "adam"
    lr: float = 1e-3
    encoding_lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    schedule: Any = "cosine"
    lr_step_epochs: int = 2
    lr_gamma: float = 10.0
    warmup_steps: int = 0
    loop: Any = "orchestrator.train.loops.train_epoch"
    accumulation_steps: int = 1
    autocast: Optional[str] = None
    batch_size: int = 64
    batches_per_epoch: Optional[int] = None
    calibration_batches: int = 8
    eval_batch_size: int = 512
    grad_clip_norm: Optional[float] = None
    seed: int = 0
    restart: bool = False
    distill: DistillSpec = field(default_factory=DistillSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    init: list[str] = field(default_factory=list)
    ptq: PtqSpec = field(default_factory=PtqSpec)
    bn_reestimate_batches: int = 0
    qdq_check_batches: int = 2
    qdq_min_sqnr_db: float = 30.0

    def validate(self) -> None:
        check_init(self.init)
        self.ptq.validate()
        _require(_is_int(self.bn_reestimate_batches) and self.bn_reestimate_batches >= 0, "qat.bn_reestimate_batches",
                 self.bn_reestimate_batches, "an integer >= 0 (0: off)")
        from .optim import check_optimizer, check_schedule  # the presets' one owner

        check_optimizer(self.optimizer)
        check_schedule(self.schedule)
        _require((isinstance(self.loop, str) and "." in self.loop) or (
            isinstance(self.loop, dict) and isinstance(self.loop.get("_target_"), str) and bool(self.loop["_target_"])),
            "qat.loop", self.loop, "the dotted path of an epoch function, or a mapping with _target_ (that path) and "
            "its keyword arguments")
        _require(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "qat.warmup_steps", self.warmup_steps,
                 "an integer >= 0")
        _require(_is_int(self.accumulation_steps) and self.accumulation_steps >= 1, "qat.accumulation_steps",
                 self.accumulation_steps, "an integer >= 1")
        _require(self.autocast is None or self.autocast in AUTOCAST_DTYPES, "qat.autocast", self.autocast,
                 "null, " + ", ".join(AUTOCAST_DTYPES))
        _require(_is_finite(self.lr) and 0 < self.lr <= MAX_LR, "qat.lr", self.lr, f"a finite number in (0, {MAX_LR:g}]")
        _require(_is_finite(self.encoding_lr) and 0 < self.encoding_lr <= MAX_LR, "qat.encoding_lr",
                 self.encoding_lr, f"a finite number in (0, {MAX_LR:g}]")
        self.distill.validate()
        self.lora.validate()
        _require(_is_finite(self.momentum) and 0 <= self.momentum < 1, "qat.momentum", self.momentum, "a number in [0, 1)")
        _require(_is_finite(self.weight_decay) and self.weight_decay >= 0, "qat.weight_decay", self.weight_decay,
                 "a number >= 0")
        _require(_is_int(self.epochs) and self.epochs >= 0, "qat.epochs", self.epochs, "an integer >= 0 (0: PTQ only)")
        _require(_is_int(self.lr_step_epochs) and self.lr_step_epochs >= 1, "qat.lr_step_epochs",
                 self.lr_step_epochs, "an integer >= 1")
        _require(_is_finite(self.lr_gamma) and self.lr_gamma >= 1, "qat.lr_gamma", self.lr_gamma, "a number >= 1")
        _require(_is_int(self.batch_size) and self.batch_size >= 1, "qat.batch_size", self.batch_size, "an integer >= 1")
        _require(self.batches_per_epoch is None or (_is_int(self.batches_per_epoch) and self.batches_per_epoch >= 1),
                 "qat.batches_per_epoch", self.batches_per_epoch, "null (the whole training split) or an integer >= 1")
        _require(_is_int(self.calibration_batches) and self.calibration_batches >= 1, "qat.calibration_batches",
                 self.calibration_batches, "an integer >= 1")
        _require(_is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "qat.eval_batch_size",
                 self.eval_batch_size, "an integer >= 1")
        _require(self.grad_clip_norm is None or (_is_finite(self.grad_clip_norm) and self.grad_clip_norm > 0),
                 "qat.grad_clip_norm", self.grad_clip_norm, "null or a number > 0")
        _require(_is_int(self.seed), "qat.seed", self.seed, "an integer")
        _require(isinstance(self.restart, bool), "qat.restart", self.restart, "true or false")
        _require(_is_int(self.qdq_check_batches) and self.qdq_check_batches >= 0, "qat.qdq_check_batches",
                 self.qdq_check_batches, "an integer >= 0 (0: no check)")
        _require(_is_finite(self.qdq_min_sqnr_db), "qat.qdq_min_sqnr_db", self.qdq_min_sqnr_db, "a finite number (dB)")


@dataclass
class FaultInjection:
    """Chaos testing: SIGKILL worker ``kill_rank`` halfway through epoch ``at_epoch`` (>= 1).

    Fires only in a run that did not resume from a checkpoint, so the restarted worker group
    (``trainer.max_failures >= 1``) resumes from the epoch before and finishes.
    """

    kill_rank: Optional[int] = None
    at_epoch: int = 1


@dataclass
class TrainerSpec:
    """Where the trial runs: ``num_workers`` Ray Train workers, or 0 for in-process (no Ray).

    ``strategy``: how the workers share the model (``train/strategies/``): ``single`` (one worker),
    ``ddp`` (DistributedDataParallel: a full replica per worker), ``fsdp`` (PyTorch FSDP2: parameters,
    gradients and optimizer state sharded, ``fully_shard`` per block); null picks ``single`` for 0 or 1
    worker, ``ddp`` for more. ``fsdp_blocks``: class names of the modules sharded as one unit each (empty:
    every child of the model's largest ``ModuleList``, else the whole model as one unit).

    ``compile``: ``torch.compile`` the (DDP-wrapped) ``sim.model`` for training; the first step
    (compilation) is left out of ``samples_per_s`` and reported as ``compile_warmup_s``.
    """

    num_workers: int = 1
    strategy: Optional[str] = None
    fsdp_blocks: list[str] = field(default_factory=list)
    compile: bool = False
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 1
    checkpoints_to_keep: int = 2
    storage_path: Optional[str] = None
    ray_address: Optional[str] = None
    fault_injection: FaultInjection = field(default_factory=FaultInjection)

    def validate(self) -> None:
        _require(_is_int(self.num_workers) and self.num_workers >= 0, "trainer.num_workers", self.num_workers,
                 "an integer >= 0 (0: in-process, no Ray)")
        _require(self.strategy is None or self.strategy in STRATEGIES, "trainer.strategy", self.strategy,
                 "null (single for 0 or 1 worker, else ddp), " + ", ".join(STRATEGIES))
        _require(self.strategy not in ("ddp", "fsdp") or self.num_workers >= 2, "trainer.strategy", self.strategy,
                 f"single with trainer.num_workers={self.num_workers} (ddp and fsdp need 2 or more workers)")
        _require(self.strategy != "single" or self.num_workers <= 1, "trainer.strategy", self.strategy,
                 f"ddp or fsdp with trainer.num_workers={self.num_workers} (single trains one worker)")
        _require(isinstance(self.fsdp_blocks, list) and all(isinstance(b, str) and b for b in self.fsdp_blocks),
                 "trainer.fsdp_blocks", self.fsdp_blocks, "a list of module class names")
        _require(_is_finite(self.cpus_per_worker) and self.cpus_per_worker > 0, "trainer.cpus_per_worker",
                 self.cpus_per_worker, "a number > 0")
        _require(_is_finite(self.gpus_per_worker) and self.gpus_per_worker > 0, "trainer.gpus_per_worker",
                 self.gpus_per_worker, "a number > 0")
        _require(_is_int(self.max_failures) and self.max_failures >= -1, "trainer.max_failures", self.max_failures,
                 "an integer >= 0, or -1 for unlimited")
        _require(_is_int(self.checkpoints_to_keep) and self.checkpoints_to_keep >= 1, "trainer.checkpoints_to_keep",
                 self.checkpoints_to_keep, "an integer >= 1")
        _require(isinstance(self.compile, bool), "trainer.compile", self.compile, "true or false")
        _require(not (self.use_gpu and self.num_workers == 0), "trainer.use_gpu", self.use_gpu,
                 "false when trainer.num_workers=0 (in-process runs use the local device)")
        fi = self.fault_injection
        if fi.kill_rank is not None:
            _require(_is_int(fi.kill_rank) and 0 <= fi.kill_rank < max(self.num_workers, 1),
                     "trainer.fault_injection.kill_rank", fi.kill_rank, f"null or a rank in [0, {self.num_workers})")
            _require(_is_int(fi.at_epoch) and fi.at_epoch >= 1, "trainer.fault_injection.at_epoch", fi.at_epoch,
                     "an integer >= 1")
            _require(self.num_workers >= 1, "trainer.fault_injection.kill_rank", fi.kill_rank,
                     "null when trainer.num_workers=0")

    @property
    def strategy_name(self) -> str:
        """``strategy``, or the default for ``num_workers``."""
        return self.strategy or ("ddp" if self.num_workers > 1 else "single")


@dataclass
class TrackingSpec:
    """MLflow: ``uri`` empty means ``sqlite:///<output root>/mlflow.db`` (absolute)."""

    uri: Optional[str] = None
    experiment: str = "qat"
    parent_run_id: Optional[str] = None
    run_name: Optional[str] = None
    trial_id: Optional[str] = None
    log_artifacts: bool = True

    def validate(self) -> None:
        _require(isinstance(self.experiment, str) and bool(self.experiment), "tracking.experiment", self.experiment,
                 "a non-empty name")


SECTIONS = {"model": ModelSpec, "data": DataSpec, "task": TaskSpec, "quant": QuantSpec, "qat": QatSpec,
            "trainer": TrainerSpec, "tracking": TrackingSpec}
QAT_QUANT_FIELDS = ("range_learning", "learn_weight_encodings", "lsq_grad_scaling")


@dataclass
class TrialSections:
    """The configuration groups of a trial (also the body of the CLI apps' schemas)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    qat: QatSpec = field(default_factory=QatSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    export_prefix: str = "model"


@dataclass
class TrialConfig(TrialSections):
    """Everything one trial needs. ``output_dir``: where exports and local checkpoints go.
    ``identity``: the run's identity (``train/identity.py``: fingerprint and decisive config), set
    when the trial is prepared."""

    output_dir: str = "outputs/trial"
    identity: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrialConfig:
        for name in SECTIONS:
            getattr(self, name).validate()
        try:
            check_name("model", self.model.name, self.model._target_, MODELS)
            check_name("data", self.data.name, self.data._target_, DATASETS)
            check_name("task", self.task.name, self.task._target_, TASKS)
        except RegistryError as exc:
            raise TrialConfigError(str(exc)) from None
        self.quant_config()
        _require(not (self.trainer.strategy_name == "fsdp" and self.qat.bn_reestimate_batches), "trainer.strategy",
                 "fsdp", "ddp or single with qat.bn_reestimate_batches > 0 (re-estimating and folding BatchNorms "
                 "into a sharded model is not supported)")
        _require(self.qat.bn_reestimate_batches == 0 or not self.quant.fold_batchnorm, "qat.bn_reestimate_batches",
                 self.qat.bn_reestimate_batches, "0 when quant.fold_batchnorm=true (BatchNorms are folded before QAT)")
        _require(isinstance(self.export_prefix, str) and self.export_prefix.isidentifier(), "export_prefix",
                 self.export_prefix, "a plain file name such as 'model'")
        return self

    def quant_config(self, overrides: dict[str, dict[str, Any]] | None = None) -> QuantConfig:
        """The ``QuantConfig`` of this trial (with per-quantizer ``overrides``, e.g. mixed
        precision's); errors name the ``quant.``/``qat.`` key."""
        q, t = self.quant, self.qat
        try:
            return QuantConfig(
                param_bw=q.param_bw, output_bw=q.output_bw, quant_scheme=q.quant_scheme, percentile=q.percentile,
                param_quant_scheme=q.param_quant_scheme,
                per_channel=q.per_channel, fold_batchnorm=q.fold_batchnorm, leaf_modules=tuple(q.leaf_modules),
                param_format=q.param_format, output_format=q.output_format, param_block_size=q.param_block_size,
                output_granularity=q.output_granularity, quantize_activations=q.quantize_activations,
                activation_sites=q.activation_sites,
                range_learning=t.range_learning, learn_weight_encodings=t.learn_weight_encodings,
                lsq_grad_scaling=t.lsq_grad_scaling, overrides={**q.overrides, **(overrides or {})},
            )
        except QuantConfigError as exc:
            msg = str(exc)
            section = "qat" if msg.startswith(QAT_QUANT_FIELDS) else "quant"
            raise TrialConfigError(f"{section}.{msg}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        """Build and validate from a plain dict; unknown keys are errors."""
        if not isinstance(d, dict):
            raise TrialConfigError(f"a trial config must be a mapping, got {type(d).__name__}")
        return _build(cls, d, "").validate()


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise TrialConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed under {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in d.items():
        sub = _dataclass_type(fields[name])
        if sub is not None:
            if not isinstance(value, dict):
                raise TrialConfigError(f"{prefix}{name} must be a mapping, got {value!r}")
            value = _build(sub, value, f"{prefix}{name}.")
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_type(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
        return factory
    return None
