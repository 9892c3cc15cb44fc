"""One QAT trial, the five steps, as run by every worker (rank) of the trial.

1. build the task, the data loaders and the pretrained FP32 model (``trial_inputs.py``); measure it
   on the test split (``fp32_<metric>`` for every metric of the task);
2. build the ``QuantizationSimModel`` on a calibration batch and calibrate it on batches drawn
   from train (the same batches on every rank), then broadcast rank 0's quantizer state so every
   rank holds bit-identical encodings; measure ``ptq_<metric>``;
3. wrap ``sim.model`` with the trial's strategy (``strategies/``: single, DDP or FSDP2), optionally
   compile it, and fine-tune with the configured loop, optimizer and schedule (``fine_tune.py``;
   optionally distilling from the FP32 model; with ``qat.lora``, only LoRA adapters on the frozen
   quantized base and the encodings train, ``adapters.py``): per epoch ``train_loss``, ``val_<metric>``,
   ``lr``, ``epoch_time_s``, ``samples_per_s``, and a checkpoint (model + quantizer state,
   optimizer, scheduler, epoch, metric history; sharded for FSDP);
4. measure ``test_<metric>``;
5. rank 0 exports ``{prefix}.pth/.onnx/.encodings`` to ``<output_dir>/export`` and logs them (a
   sharded model is gathered on rank 0 first), then checks the export in onnxruntime against the
   simulation on the first test batches (``qdq_agree_top1``, ``qdq_sqnr_db``; below
   ``qat.qdq_min_sqnr_db`` the trial fails). LoRA adapters are merged into the weights first.

Rank 0's MLflow writes run in call order on a background thread (``BackgroundRunLogger``), off
the path to the first training step; all of them land before the final report.

Random numbers are a pure function of ``(qat.seed, epoch, rank)``: every epoch reseeds, so a
run resumed from a checkpoint draws what the uninterrupted run would have drawn. Divergence
(non-finite gradients, an exploded loss, a model left at chance) is decided on all-reduced
values, so all ranks stop together and the trial ends cleanly (no retry) with status ``diverged``.
"""

from __future__ import annotations

import random
import time
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..quant import ExportError, QuantizationSimModel, export_agreement, keep_freed_host_memory
from ..tasks import head, to_device
from ..tracking.recovery import recovery_metrics
from ..tracking.run_content import epoch_metric_keys, log_export
from .adapters import attach_lora, trained_parameters
from .config import TrialConfig
from .data import is_iterable
from .distributed import all_gather, broadcast_quantizer_state, digest, full_quantizer_state, quantizer_state
from .divergence import stayed_at_chance
from .fine_tune import Training, divergence, epoch_timing
from .identity import check_state
from .loops import Distillation, evaluate
from .ptq_steps import build_sim, calibrate_with_init, reestimate_batchnorms
from .session import LocalSession, RaySession, Session
from .strategies import make_strategy
from .trial_inputs import build_inputs

if TYPE_CHECKING:
    from ..tracking.background import BackgroundRunLogger

QDQ_CHECK_SAMPLES = 64  # samples of each test batch the export check runs (onnxruntime is not fast)


def reseed(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def prefixed(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{"acc": 94.8}`` -> ``{"<stage>_acc": 94.8}``."""
    return {f"{stage}_{k}": v for k, v in metrics.items()}


def _tracker(cfg: TrialConfig, run_id: str | None, session: Session) -> BackgroundRunLogger | None:
    if session.rank != 0 or not run_id:
        return None
    from ..tracking.background import BackgroundRunLogger

    return BackgroundRunLogger(cfg.tracking.uri, run_id)


def qat_worker(payload: dict[str, Any], on_report=None) -> dict[str, Any]:
    """Ray Train entry point (and in-process entry with ``payload["local"]``): run the trial.

    ``payload``: ``{"trial": TrialConfig dict, "run_id": MLflow run id or None, "local": bool,
    "checkpoint_root": where Ray persists this run's checkpoints}``.
    Returns the final metrics (rank 0's, in-process); on Ray they are also the last report.
    ``on_report``: in-process only, called with every report's metrics (the sweep's Tune hook).
    """
    entered_at = time.time()
    keep_freed_host_memory()  # no page faults on every step's fresh CPU tensors (quant/host_memory.py)
    cfg = TrialConfig.from_dict(payload["trial"])
    if payload.get("local"):
        session: Session = LocalSession(Path(cfg.output_dir) / "checkpoints", cfg.trainer.checkpoints_to_keep,
                                        device=payload.get("device"), on_report=on_report)
    else:
        session = RaySession(payload["checkpoint_root"])
    return run_workflow(cfg, session, payload.get("run_id"), payload.get("started_at"), entered_at)


def run_workflow(cfg: TrialConfig, session: Session, run_id: str | None,
                 started_at: float | None = None, entered_at: float | None = None) -> dict[str, Any]:
    """The trial on this rank. With ``started_at`` (``time.time()`` when the driver started the
    trial) the first epoch reports ``startup_s`` (to the first optimizer step) and
    ``worker_start_s`` (to ``entered_at``, when this worker function began)."""
    tracker = _tracker(cfg, run_id, session)  # rank 0 only; its MLflow writes run on a thread
    trial = Trial(cfg, session, tracker, started_at, entered_at)
    if tracker is None:
        return trial.run()
    try:
        final = trial.run()
    except BaseException:
        tracker.close(raise_errors=False)
        raise
    tracker.close()
    return final


def _stage(state: dict[str, Any], stage: str) -> dict[str, float]:
    """A checkpoint's FP32 or PTQ metrics (checkpoints written before tasks held ``<stage>_acc`` only)."""
    return state[stage] if stage in state else {"acc": state[f"{stage}_acc"]}


class Trial:
    """The state one rank of a trial works on; ``run`` is the five steps, each a method with one job."""

    def __init__(self, cfg: TrialConfig, session: Session, tracker: BackgroundRunLogger | None,
                 started_at: float | None, entered_at: float | None) -> None:
        self.cfg, self.session, self.tracker = cfg, session, tracker
        self.started_at, self.entered_at = started_at, entered_at
        self.rank, self.world, self.device = session.rank, session.world_size, session.device
        self.name = cfg.tracking.run_name or ""
        self.strategy = make_strategy(cfg.trainer, self.device)
        self.fp32: dict[str, float] = {}
        self.ptq: dict[str, float] = {}
        self.start_epoch = 0

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.name}] {msg}" if self.name else msg, flush=True)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        return evaluate(model, self.inputs.loaders[split], self.inputs.task, self.device,
                        lockstep=self.strategy.lockstep, filler=self.inputs.calibration[0])

    # ------------------------------------------------------------------ the five steps
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        reseed(cfg.qat.seed, -1, 0)
        self.inputs = inputs = build_inputs(cfg, self.rank, self.world, self.device)
        # quant.mixed (ptq_steps.py): the sim, and the bit widths it chose
        sim, self.mixed = build_sim(cfg, inputs.model, inputs.dummy, inputs.task, inputs.calibration, self.log)
        state = self.load_state()
        if state is not None and "final" in state:  # the trial had already ended: report it again
            self.log(f"this run already ended ({state['final']['status']}) with this same config: its results "
                     "again, nothing retrained")
            self.session.report(state["final"])
            return state["final"]
        if state is None:
            self.fp32, self.ptq, extra = self.calibrate(sim)
            history: list[dict[str, Any]] = []
        else:
            self.fp32, self.ptq, extra = _stage(state, "fp32"), _stage(state, "ptq"), {}
            self.start_epoch, history = state["epoch"] + 1, state["history"]
            self.log(f"resumed from the checkpoint of epoch {state['epoch']}")
            self.relog(history)
        inputs.calibration = inputs.calibration[:1]  # kept: a lockstep evaluation's filler batch
        attach_lora(cfg.qat, sim)  # qat.lora: adapters on the frozen base (adapters.py), before wrapping
        trained = trained_parameters(sim)
        extra.update(trained)
        if self.tracker is not None:
            self.tracker.log_metrics(trained, step=0)
        if cfg.qat.lora.rank:
            self.log(f"LoRA rank {cfg.qat.lora.rank}: {extra['lora_params']:.0f} adapter parameters train, "
                     f"{extra['trained_params']:.0f} in all with the encodings")
        self.tag_placement()
        distill = self.distillation()
        training = Training.start(cfg, sim, distill.teacher if distill else None, inputs.data.train,
                                  inputs.data.collate_fn, self.strategy, self.rank, self.world, state)
        ended = self.fine_tune(sim, training, history, distill, extra)
        if ended is not None:
            return ended
        extra.update(reestimate_batchnorms(cfg.qat, sim, inputs.task, inputs.data, self.device, self.log))  # ptq_steps.py
        return self.finish(sim, training, history, extra)

    def load_state(self) -> dict[str, Any] | None:
        """The last checkpoint of this trial (None: a fresh trial); one of another config is refused."""
        state = self.session.load_state()
        if state is not None:  # a checkpoint of another config is never loaded into this one
            check_state(state, self.cfg.identity, f"of trial {self.name or self.cfg.output_dir}")
        return state

    def calibrate(self, sim: QuantizationSimModel) -> tuple:
        """Steps 1-2 on a fresh trial: FP32 metrics, calibration, broadcast, PTQ metrics."""
        task, data, loaders = self.inputs.task, self.inputs.data, self.inputs.loaders
        fp32 = evaluate(self.inputs.model, loaders["test"], task, self.device)  # nothing sharded yet
        init = calibrate_with_init(self.cfg.qat, sim, task, self.inputs.calibration,
                                   lambda: evaluate(sim.model, loaders["test"], task, self.device),
                                   self.log) | self.mixed  # qat.init's PTQ steps, each measured (ptq_steps.py)
        local_digests = all_gather(digest(quantizer_state(sim.model)))
        broadcast_quantizer_state(sim.model)
        extra = {"calibration_digests": ",".join(all_gather(digest(quantizer_state(sim.model)))),
                 "local_calibration_digests": ",".join(local_digests), **init}
        ptq = evaluate(sim.model, loaders["test"], task, self.device)  # not sharded yet
        if self.tracker is not None:
            sizes = {f"{split}_samples": len(getattr(data, split)) for split in ("val", "test")
                     if not is_iterable(getattr(data, split))}
            self.tracker.log_metrics({**prefixed("fp32", fp32), **prefixed("ptq", ptq), **sizes, **init}, step=0)
        self.log(f"FP32 {task.describe(fp32)}  PTQ {task.describe(ptq)}  ({len(sim.activation_quantizers())} "
                 f"activation quantizers, {len(sim.param_quantizers())} weight quantizers, {self.world} worker(s), "
                 f"strategy {self.strategy.name})")
        return fp32, ptq, extra

    def tag_placement(self) -> None:
        nodes = sorted(set(all_gather(self.session.node_id)))
        if self.tracker is not None:
            self.tracker.set_tags({"qat.nodes": ",".join(nodes), "qat.world_size": str(self.world),
                                   "qat.strategy": self.strategy.name})

    def distillation(self) -> Distillation | None:
        """The FP32 model as a frozen teacher (``qat.distill``), or None."""
        d = self.cfg.qat.distill
        if not d.enabled:
            return None
        model = self.inputs.model
        for p in model.parameters():
            p.requires_grad_(False)
        return Distillation(model.eval(), d.temperature, d.weight, d.task_weight)

    def relog(self, history: list[dict[str, Any]]) -> None:
        """Epochs checkpointed before a crash but never logged reach MLflow: on the writer thread,
        so that an MLflow outage at resume does not hold rank 0 while the other ranks wait."""
        if self.tracker is None:
            return
        keys, primary = epoch_metric_keys(self.inputs.task), f"val_{self.inputs.task.primary}"

        def log_missing(logger) -> None:
            logged = logger.logged_steps(primary)
            for entry in history:
                if entry["epoch"] not in logged:
                    logger.log_metrics({k: v for k, v in entry.items() if k in keys}, step=entry["epoch"])

        self.tracker.run(log_missing)

    def report(self, metrics: dict[str, Any], sim: QuantizationSimModel, training: Training, epoch: int,
               history: list, final: dict[str, Any] | None = None) -> None:
        """Report ``metrics`` with a checkpoint: rank 0's state (tensors, numbers, strings and
        containers only: read back with ``weights_only=True``) and, for a sharded strategy, every
        rank's shards. ``final`` marks the trial as ended."""
        entries, write_shards = self.strategy.checkpoint(sim, training.optimizer, self.rank)
        state = None
        if self.rank == 0:
            state = {**entries, "scheduler": training.schedule.scheduler.state_dict(), "epoch": epoch,
                     "history": history, "fp32": self.fp32, "ptq": self.ptq,
                     "rng": {"seed": self.cfg.qat.seed, "next_epoch": epoch + 1},
                     "identity": self.cfg.identity}
            if final is not None:
                state["final"] = final
        self.session.report(metrics, state, write_shards)

    def base_metrics(self) -> dict[str, Any]:
        return {**prefixed("fp32", self.fp32), **prefixed("ptq", self.ptq), "resumed_from_epoch": self.start_epoch - 1}

    def fine_tune(self, sim: QuantizationSimModel, training: Training, history: list,
                  distill: Distillation | None, extra: dict[str, Any]) -> dict[str, Any] | None:
        """Step 3; returns the final report when the trial diverged, else None."""
        cfg, qat, task = self.cfg, self.cfg.qat, self.inputs.task
        train_set = self.inputs.data.train
        fault = cfg.trainer.fault_injection
        base, keys = self.base_metrics(), epoch_metric_keys(task)
        for epoch in range(self.start_epoch, qat.epochs):
            epoch_start = time.perf_counter()
            reseed(qat.seed, epoch, self.rank)
            lr = training.optimizer.param_groups[0]["lr"]
            halfway = len(training.loader) // 2 if not is_iterable(train_set) else 2
            kill_at = halfway if fault.kill_rank == self.rank and fault.at_epoch == epoch and self.start_epoch == 0 \
                else None
            warmup = 1 if cfg.trainer.compile and epoch == self.start_epoch else 0
            ctx = training.context(task, distill, kill_at, warmup, uneven=is_iterable(train_set))
            totals = training.epoch(epoch, train_set, ctx, self.world)
            message = divergence(cfg, epoch, totals)
            if message is not None:
                self.log(message)
                final = {**base, "epoch": epoch, f"val_{task.primary}": float("nan"), "status": "diverged",
                         "error": message}
                self.report(final, sim, training, epoch - 1, history, final)
                return final
            val = self.evaluate(sim.model, "val")
            training.end_epoch()
            metrics = {**base, "epoch": epoch, "train_loss": totals.mean_loss, **prefixed("val", val), "lr": lr,
                       **epoch_timing(totals, epoch_start), **self.first_epoch_metrics(epoch, totals, warmup)}
            if distill is not None:
                metrics["train_distill_loss"] = totals.mean_distill
            history.append(metrics)
            if self.tracker is not None:  # before the report: a sweep's scheduler may stop the trial there
                self.tracker.log_metrics({k: v for k, v in metrics.items() if k in keys}, step=epoch)
            self.report({**metrics, **extra}, sim, training, epoch, history)
            self.log(f"epoch {epoch + 1}/{qat.epochs}  loss {totals.mean_loss:.4f}  val {task.describe(val)}  "
                     f"lr {lr:.3g}  {metrics['epoch_time_s']:.1f}s  {metrics['samples_per_s']:.0f} samples/s")
        return None

    def first_epoch_metrics(self, epoch: int, totals, warmup: int) -> dict[str, float]:
        """``compile_warmup_s`` on a compiled trial's first epoch; ``startup_s``/``worker_start_s`` on epoch 0."""
        out: dict[str, float] = {}
        result = totals.result
        if warmup:
            out["compile_warmup_s"] = result.warmup_seconds
        if epoch == 0 and self.started_at is not None and result.first_step_at is not None:
            out["startup_s"] = result.first_step_at - self.started_at
            if self.entered_at is not None:
                out["worker_start_s"] = self.entered_at - self.started_at
        return out

    def finish(self, sim: QuantizationSimModel, training: Training, history: list,
               extra: dict[str, Any]) -> dict[str, Any]:
        """Steps 4-5: test metrics, the chance check, export and its MLflow artifacts, the final report."""
        qat, task = self.cfg.qat, self.inputs.task
        test = self.evaluate(sim.model, "test")
        val = ({k[len("val_"):]: v for k, v in history[-1].items() if k.startswith("val_")} if history
               else self.evaluate(sim.model, "val"))
        final = {**self.base_metrics(), "epoch": qat.epochs - 1, **prefixed("val", val), **prefixed("test", test),
                 **self.recovery(test), "status": "finished", **extra, **self.state_checks(sim, training)}
        if qat.epochs > 0 and stayed_at_chance(task, self.inputs.num_outputs, self.fp32, val):
            final["status"] = "diverged"
            final["error"] = (f"training diverged: val_{task.primary} {val[task.primary]:.4g} is no better than a "
                              f"random guess after {qat.epochs} epoch(s) (FP32: {self.fp32[task.primary]:.4g}; "
                              f"qat.lr={qat.lr}); lower qat.lr")
            self.log(final["error"])
        else:
            final.update(self.export(sim, test))
        if self.tracker is not None:
            self.tracker.flush()  # everything is in MLflow before the report that ends the trial
        self.report(final, sim, training, qat.epochs - 1, history, final)
        return final

    def recovery(self, test: dict[str, float]) -> dict[str, float]:
        """``<m>_ptq_gap`` and (where PTQ lost at least 2% and QAT ran) ``<m>_recovered`` for the task's
        primary metric (``tracking/recovery.py``), logged now."""
        task = self.inputs.task
        m = task.primary
        if m not in test or m not in self.fp32 or m not in self.ptq:
            return {}
        out = recovery_metrics(m, self.fp32[m], self.ptq[m], test[m], task.metric(m).mode == "max")
        if self.cfg.qat.epochs == 0:  # PTQ only: nothing was trained to recover anything
            out.pop(f"{m}_recovered", None)
        if self.tracker is not None and out:
            self.tracker.log_metrics(out, step=max(self.cfg.qat.epochs - 1, 0))
        if f"{m}_recovered" in out:
            self.log(f"QAT recovered {100 * out[f'{m}_recovered']:.0f}% of PTQ's {m} loss "
                     f"({100 * out[f'{m}_ptq_gap']:.1f}% of FP32)")
        return out

    def state_checks(self, sim: QuantizationSimModel, training: Training) -> dict[str, Any]:
        """``encoding_digests``: every rank's digest of its whole quantizer state (equal: identical
        encodings); ``param_optimizer_bytes``: the most parameter + optimizer-state bytes a rank holds."""
        digests = all_gather(digest(full_quantizer_state(sim.model)))
        held = all_gather(self.strategy.memory_bytes(sim.model, training.optimizer))
        return {"encoding_digests": ",".join(digests), "param_optimizer_bytes": max(held)}

    def export(self, sim: QuantizationSimModel, test: dict[str, float]) -> dict[str, Any]:
        """Step 5: the full simulation exported and verified by rank 0 (gathered first when sharded)."""
        cfg, qat, inputs = self.cfg, self.cfg.qat, self.inputs
        cpu_dummy = to_device(inputs.dummy, torch.device("cpu"))
        full = self.strategy.export_sim(
            sim, lambda: attach_lora(qat, QuantizationSimModel(inputs.reload_model(cfg), cpu_dummy, sim.config)),
            self.rank)
        if full is None:
            return {}
        export_dir = Path(cfg.output_dir) / "export"
        paths = full.export(str(export_dir), cfg.export_prefix, cpu_dummy)
        check = self.check_export(full, paths)
        if self.tracker is not None:
            self.tracker.log_metrics({**prefixed("test", test), **check}, step=max(qat.epochs - 1, 0))
            if cfg.tracking.log_artifacts:
                log_export(self.tracker, export_dir, cfg.export_prefix, full.summary())
        self.log(f"test {inputs.task.describe(test)}  exported to {export_dir}")
        return {"export_dir": str(export_dir), **{f"export_{kind}": p for kind, p in paths.items()}, **check}

    def check_export(self, full: QuantizationSimModel, paths: dict[str, str]) -> dict[str, float]:
        """The export against its simulation in onnxruntime on the first test batches (rank 0, CPU):
        the ``qdq_*`` metrics; raises ``ExportError`` when they disagree (``qat.qdq_min_sqnr_db``)."""
        qat, inputs = self.cfg.qat, self.inputs
        if qat.qdq_check_batches == 0:
            return {}
        cpu = torch.device("cpu")
        batches = [to_device(head(inputs.task.inputs(b), QDQ_CHECK_SAMPLES), cpu)
                   for b in islice(inputs.loaders["test"], qat.qdq_check_batches)]
        agreement = export_agreement(full, paths, batches)
        self.log(f"export check (onnxruntime QDQ vs the simulation, {agreement.rows} rows): top-1 agreement "
                 f"{100 * agreement.top1:.1f}%, output SQNR {agreement.sqnr_db:.1f} dB")
        problem = agreement.problem(qat.qdq_min_sqnr_db)
        if problem:
            raise ExportError(f"{problem} (qat.qdq_min_sqnr_db={qat.qdq_min_sqnr_db:g}); the export is kept in "
                                   f"{Path(paths['onnx']).parent} for inspection")
        return agreement.metrics()
