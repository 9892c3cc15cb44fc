"""One QAT trial, the five steps, as run by every worker (rank) of the trial.

1. build the task, the data loaders and the pretrained FP32 model; measure it on the test split
   (``fp32_<metric>`` for every metric of the task);
2. build the ``QuantizationSimModel`` on a calibration batch and calibrate it on batches drawn
   from train (the same batches on every rank), then broadcast rank 0's quantizer state so every
   rank holds bit-identical encodings; measure ``ptq_<metric>``;
3. wrap ``sim.model`` in DistributedDataParallel (several ranks), optionally compile it, and
   fine-tune (optionally distilling from the FP32 model): per epoch ``train_loss``, ``val_<metric>``,
   ``lr``, ``epoch_time_s``, ``samples_per_s``, and a checkpoint (model + quantizer state,
   optimizer, scheduler, epoch, metric history);
4. measure ``test_<metric>``;
5. rank 0 exports ``{prefix}.pth/.onnx/.encodings`` to ``<output_dir>/export`` and logs them.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..quant import QuantizationSimModel, keep_freed_host_memory
from ..tasks import Task, head, to_device
from ..tracking.run_content import epoch_metric_keys, log_export
from .builders import build_data, load_pretrained, task_of
from .config import TrialConfig
from .data import calibration_batches, eval_loader, is_iterable, set_epoch, train_loader
from .distributed import all_gather, all_reduce_sum, broadcast_quantizer_state, digest, distributed, quantizer_state
from .divergence import EXPLODED_LOSS_FACTOR, exploded_loss, stayed_at_chance
from .identity import check_state
from .loops import Distillation, evaluate, train_epoch
from .ptq_steps import build_sim, calibrate_with_init, reestimate_batchnorms
from .session import LocalSession, RaySession, Session

if TYPE_CHECKING:
    from ..tracking.background import BackgroundRunLogger


def reseed(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def prefixed(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{"acc": 94.8}`` -> ``{"<stage>_acc": 94.8}``."""
    return {f"{stage}_{k}": v for k, v in metrics.items()}


def make_optimizer(cfg: TrialConfig, sim: QuantizationSimModel) -> torch.optim.Optimizer:
    """Weights at ``qat.lr`` with ``weight_decay``; trainable encodings in their own group at
    ``qat.encoding_lr`` without decay (decay would shrink ranges). Learned scales are checked
    after every step: one that reaches its floor is warned about by name."""
    groups = [{"params": sim.model_parameters(), "weight_decay": cfg.qat.weight_decay, "lr": cfg.qat.lr}]
    if sim.quantizer_parameters():
        groups.append({"params": sim.quantizer_parameters(), "weight_decay": 0.0, "lr": cfg.qat.encoding_lr})
    if cfg.qat.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.qat.lr, momentum=cfg.qat.momentum)
    else:
        optimizer = torch.optim.Adam(groups, lr=cfg.qat.lr)
    if sim.quantizer_parameters():
        sim.watch_encodings(optimizer)
    return optimizer


def make_scheduler(cfg: TrialConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """``qat.schedule``, stepped once per epoch: cosine to 0 over ``qat.epochs``, a step decay, or constant."""
    qat = cfg.qat
    if qat.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(qat.epochs, 1))
    if qat.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=qat.lr_step_epochs, gamma=1.0 / qat.lr_gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


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
    """The state one rank of a trial works on; ``run`` is the five steps."""

    def __init__(self, cfg: TrialConfig, session: Session, tracker: BackgroundRunLogger | None,
                 started_at: float | None, entered_at: float | None) -> None:
        self.cfg, self.session, self.tracker = cfg, session, tracker
        self.started_at, self.entered_at = started_at, entered_at
        self.rank, self.world, self.device = session.rank, session.world_size, session.device
        self.name = cfg.tracking.run_name or ""

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.name}] {msg}" if self.name else msg, flush=True)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        return evaluate(model, self.loaders[split], self.task, self.device)

    # ------------------------------------------------------------------ the five steps
    def run(self) -> dict[str, Any]:
        cfg, qat, device = self.cfg, self.cfg.qat, self.device
        reseed(qat.seed, -1, 0)
        self.task: Task = task_of(cfg.task)
        data = build_data(cfg.data)
        workers = cfg.data.loader_workers
        self.loaders = {split: eval_loader(getattr(data, split), qat.eval_batch_size, self.rank, self.world, device,
                                           data.collate_fn, workers) for split in ("val", "test")}
        model = load_pretrained(cfg.model, data, cfg.model.checkpoint).to(device)
        calibration = [to_device(b, device) for b in calibration_batches(
            data.train, qat.batch_size, qat.calibration_batches, qat.seed, data.collate_fn)]
        self.dummy = head(self.task.inputs(calibration[0]), 2)
        with torch.no_grad():
            self.num_outputs = int(self.task.forward(model, calibration[0]).shape[-1])
        sim, self.mixed = build_sim(cfg, model, self.dummy, self.task, calibration, self.log)  # quant.mixed: ptq_steps.py
        state = self.session.load_state()
        if state is not None:  # a checkpoint of another config is never loaded into this one
            check_state(state, cfg.fingerprint, f"of trial {self.name or cfg.output_dir}")
        if state is not None and "final" in state:  # the trial had already ended: report it again
            self.log(f"this run already ended ({state['final']['status']}) with this same config: its results "
                     "again, nothing retrained")
            self.session.report(state["final"])
            return state["final"]
        if state is None:
            self.fp32, self.ptq, extra = self.calibrate(model, sim, calibration, data)
            self.start_epoch, history = 0, []
        else:
            sim.model.load_state_dict(state["model"])
            self.fp32, self.ptq, extra = _stage(state, "fp32"), _stage(state, "ptq"), {}
            self.start_epoch, history = state["epoch"] + 1, state["history"]
            self.log(f"resumed from the checkpoint of epoch {state['epoch']}")
            self.relog(history)
        del calibration
        nodes = sorted(set(all_gather(self.session.node_id)))
        if self.tracker is not None:
            self.tracker.set_tags({"qat.nodes": ",".join(nodes), "qat.world_size": str(self.world)})
        distill = None
        if qat.distill.enabled:
            for p in model.parameters():
                p.requires_grad_(False)
            d = qat.distill
            distill = Distillation(model.eval(), d.temperature, d.weight, d.task_weight)
        ended = self.fine_tune(sim, data, state, history, distill, extra)
        if ended is not None:
            return ended
        extra.update(reestimate_batchnorms(qat, sim, self.task, data, device, self.log))  # ptq_steps.py
        return self.finish(sim, history, extra)

    def calibrate(self, model: nn.Module, sim: QuantizationSimModel, calibration: list, data) -> tuple:
        """Steps 1-2 on a fresh trial: FP32 metrics, calibration, broadcast, PTQ metrics."""
        fp32 = self.evaluate(model, "test")
        task = self.task
        init = calibrate_with_init(self.cfg.qat, sim, task, calibration, lambda: self.evaluate(sim.model, "test"),
                                   self.log) | self.mixed  # qat.init's PTQ steps, each measured (ptq_steps.py)
        local_digests = all_gather(digest(quantizer_state(sim.model)))
        broadcast_quantizer_state(sim.model)
        extra = {"calibration_digests": ",".join(all_gather(digest(quantizer_state(sim.model)))),
                 "local_calibration_digests": ",".join(local_digests), **init}
        ptq = self.evaluate(sim.model, "test")
        if self.tracker is not None:
            sizes = {f"{split}_samples": len(getattr(data, split)) for split in ("val", "test")
                     if not is_iterable(getattr(data, split))}
            self.tracker.log_metrics({**prefixed("fp32", fp32), **prefixed("ptq", ptq), **sizes, **init}, step=0)
        self.log(f"FP32 {task.describe(fp32)}  PTQ {task.describe(ptq)}  ({len(sim.activation_quantizers())} "
                 f"activation quantizers, {len(sim.param_quantizers())} weight quantizers, {self.world} worker(s))")
        return fp32, ptq, extra

    def relog(self, history: list[dict[str, Any]]) -> None:
        """Epochs checkpointed before a crash but never logged reach MLflow: on the writer thread,
        so that an MLflow outage at resume does not hold rank 0 while the other ranks wait."""
        if self.tracker is None:
            return
        keys, primary = epoch_metric_keys(self.task), f"val_{self.task.primary}"

        def log_missing(logger) -> None:
            logged = logger.logged_steps(primary)
            for entry in history:
                if entry["epoch"] not in logged:
                    logger.log_metrics({k: v for k, v in entry.items() if k in keys}, step=entry["epoch"])

        self.tracker.run(log_missing)

    def checkpoint(self, sim, optimizer, scheduler, epoch: int, history: list,
                   final: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Rank 0's checkpoint state (None on other ranks); ``final`` marks the trial as ended.
        Tensors, numbers, strings and containers only: it is read back with ``weights_only=True``."""
        if self.rank != 0:
            return None
        state = {"model": sim.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                 "fp32": self.fp32, "ptq": self.ptq, "rng": {"seed": self.cfg.qat.seed, "next_epoch": epoch + 1},
                 "identity": {"fingerprint": self.cfg.fingerprint}}
        if final is not None:
            state["final"] = final
        return state

    def base_metrics(self) -> dict[str, Any]:
        return {**prefixed("fp32", self.fp32), **prefixed("ptq", self.ptq), "resumed_from_epoch": self.start_epoch - 1}

    def fine_tune(self, sim, data, state, history: list, distill: Distillation | None,
                  extra: dict[str, Any]) -> dict[str, Any] | None:
        """Step 3; returns the final report when the trial diverged, else None."""
        cfg, qat, device, task = self.cfg, self.cfg.qat, self.device, self.task
        train_model: nn.Module = sim.model
        if distributed():
            ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(sim.model, device_ids=ids)
        if cfg.trainer.compile:
            train_model = torch.compile(train_model)
        optimizer = make_optimizer(cfg, sim)
        scheduler = make_scheduler(cfg, optimizer)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        per_rank_batch = max(1, qat.batch_size // self.world)
        loader, sampler = train_loader(data.train, per_rank_batch, self.rank, self.world, qat.seed, device,
                                       data.collate_fn, cfg.data.loader_workers)
        params = [p for p in sim.model.parameters() if p.requires_grad]
        fault = cfg.trainer.fault_injection
        base = self.base_metrics()
        keys = epoch_metric_keys(task)
        primary = f"val_{task.primary}"
        start_epoch = self.start_epoch
        self.optimizer, self.scheduler = optimizer, scheduler

        def diverged(epoch: int, message: str) -> dict[str, Any]:
            self.log(message)
            final = {**base, "epoch": epoch, primary: float("nan"), "status": "diverged", "error": message}
            self.session.report(final, self.checkpoint(sim, optimizer, scheduler, epoch - 1, history, final))
            return final

        for epoch in range(start_epoch, qat.epochs):
            epoch_start = time.perf_counter()
            reseed(qat.seed, epoch, self.rank)
            set_epoch(data.train, sampler, epoch)
            lr = optimizer.param_groups[0]["lr"]
            halfway = len(loader) // 2 if not is_iterable(data.train) else 2
            kill_at = halfway if fault.kill_rank == self.rank and fault.at_epoch == epoch and start_epoch == 0 else None
            warmup = 1 if cfg.trainer.compile and epoch == start_epoch else 0
            result = train_epoch(train_model, loader, optimizer, params, task, device, clip=qat.grad_clip_norm,
                                 distill=distill, kill_at_step=kill_at, warmup_steps=warmup,
                                 uneven=is_iterable(data.train))
            # every decision on all-reduced values: with uneven (iterable) data the ranks run different
            # numbers of steps, and one may diverge at a step the others never take
            (loss_sum, distill_sum, samples, diverged_ranks, uniform_sum, uniform_ranks, train_seconds,
             timed_samples) = all_reduce_sum(
                [result.loss_sum, result.distill_sum, result.samples, float(result.diverged_step is not None),
                 result.uniform_loss or 0.0, float(result.uniform_loss is not None), result.seconds,
                 result.timed_samples], device)
            if diverged_ranks:
                where = f", step {result.diverged_step}" if result.diverged_step is not None else ""
                return diverged(epoch, f"training diverged: non-finite loss/gradients at epoch {epoch}{where} "
                                       f"(qat.lr={qat.lr}, qat.optimizer={qat.optimizer}); lower qat.lr or set "
                                       "qat.grad_clip_norm")
            mean_loss = loss_sum / max(samples, 1)
            uniform = uniform_sum / uniform_ranks if uniform_ranks else None
            if exploded_loss(mean_loss, uniform):
                return diverged(epoch, f"training diverged: mean training loss {mean_loss:.3g} at epoch {epoch} is "
                                       f"more than {EXPLODED_LOSS_FACTOR:g}x that of a uniform guess (qat.lr={qat.lr}, "
                                       f"qat.optimizer={qat.optimizer}); lower qat.lr or set qat.grad_clip_norm")
            train_seconds = max(train_seconds / self.world, 1e-9)
            val = self.evaluate(sim.model, "val")
            scheduler.step()
            metrics = {**base, "epoch": epoch, "train_loss": mean_loss, **prefixed("val", val), "lr": lr,
                       "epoch_time_s": time.perf_counter() - epoch_start, "samples_per_s": timed_samples / train_seconds}
            if distill is not None:
                metrics["train_distill_loss"] = distill_sum / max(samples, 1)
            if warmup:
                metrics["compile_warmup_s"] = result.warmup_seconds
            if epoch == 0 and self.started_at is not None and result.first_step_at is not None:
                metrics["startup_s"] = result.first_step_at - self.started_at
                if self.entered_at is not None:
                    metrics["worker_start_s"] = self.entered_at - self.started_at
            history.append(metrics)
            if self.tracker is not None:  # before the report: a sweep's scheduler may stop the trial there
                self.tracker.log_metrics({k: v for k, v in metrics.items() if k in keys}, step=epoch)
            self.session.report({**metrics, **extra},
                                self.checkpoint(sim, optimizer, scheduler, epoch, history))
            self.log(f"epoch {epoch + 1}/{qat.epochs}  loss {mean_loss:.4f}  val {task.describe(val)}  lr {lr:.3g}  "
                     f"{metrics['epoch_time_s']:.1f}s  {metrics['samples_per_s']:.0f} samples/s")
        return None

    def finish(self, sim: QuantizationSimModel, history: list, extra: dict[str, Any]) -> dict[str, Any]:
        """Steps 4-5: test metrics, the chance check, export and its MLflow artifacts, the final report."""
        cfg, qat, task = self.cfg, self.cfg.qat, self.task
        base = self.base_metrics()
        test = self.evaluate(sim.model, "test")
        val = ({k[len("val_"):]: v for k, v in history[-1].items() if k.startswith("val_")} if history
               else self.evaluate(sim.model, "val"))
        final = {**base, "epoch": qat.epochs - 1, **prefixed("val", val), **prefixed("test", test),
                 "status": "finished", **extra}
        if qat.epochs > 0 and stayed_at_chance(task, self.num_outputs, self.fp32, val):
            final["status"] = "diverged"
            final["error"] = (f"training diverged: val_{task.primary} {val[task.primary]:.4g} is no better than a "
                              f"random guess after {qat.epochs} epoch(s) (FP32: {self.fp32[task.primary]:.4g}; "
                              f"qat.lr={qat.lr}); lower qat.lr")
            self.log(final["error"])
        elif self.rank == 0:
            export_dir = Path(cfg.output_dir) / "export"
            paths = sim.export(str(export_dir), cfg.export_prefix, to_device(self.dummy, torch.device("cpu")))
            final["export_dir"] = str(export_dir)
            final.update({f"export_{kind}": p for kind, p in paths.items()})
            if self.tracker is not None:
                self.tracker.log_metrics(prefixed("test", test), step=max(qat.epochs - 1, 0))
                if cfg.tracking.log_artifacts:
                    log_export(self.tracker, export_dir, cfg.export_prefix, sim.summary())
            self.log(f"test {task.describe(test)}  exported to {export_dir}")
        if self.tracker is not None:
            self.tracker.flush()  # everything is in MLflow before the report that ends the trial
        self.session.report(final, self.checkpoint(sim, self.optimizer, self.scheduler, qat.epochs - 1, history, final))
        return final
