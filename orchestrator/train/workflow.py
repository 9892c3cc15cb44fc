"""One QAT trial, the five steps, as run by every worker (rank) of the trial.

1. load the pretrained FP32 model and measure ``fp32_acc`` (test split);
2. build the ``QuantizationSimModel`` and calibrate it on batches drawn from train (the same
   batches on every rank), then broadcast rank 0's quantizer state so every rank holds
   bit-identical encodings; measure ``ptq_acc``;
3. wrap ``sim.model`` in DistributedDataParallel (when there are several ranks) and fine-tune:
   per epoch ``train_loss``, ``val_acc``, ``lr``, ``epoch_time_s``, ``samples_per_s``, and a
   checkpoint (model + quantizer state, optimizer, scheduler, epoch, metric history);
4. measure ``test_acc``;
5. rank 0 exports ``{prefix}.pth/.onnx/.encodings`` to ``<output_dir>/export`` and logs them.

Rank 0's MLflow writes run in call order on a background thread (``BackgroundRunLogger``), off
the path to the first training step; all of them land before the final report.

Random numbers are a pure function of ``(qat.seed, epoch, rank)``: every epoch reseeds, so a
run resumed from a checkpoint draws what the uninterrupted run would have drawn.
Divergence is detected on the all-reduced gradient norm, which every rank sees identically,
so all ranks stop at the same step and the trial ends cleanly (no retry) with status
``diverged``.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..quant import QuantizationSimModel, keep_freed_host_memory
from ..tracking.run_content import EPOCH_METRICS, FIRST_EPOCH_METRICS, log_export
from .builders import build_data, load_pretrained
from .config import TrialConfig
from .distributed import (
    all_gather,
    all_reduce_sum,
    broadcast_quantizer_state,
    digest,
    distributed,
    quantizer_state,
)
from .session import LocalSession, RaySession, Session

if TYPE_CHECKING:
    from ..tracking.background import BackgroundRunLogger

# An epoch whose mean training loss exceeds this many times ln(C), the cross-entropy of a uniform
# guess over C classes, has diverged (quantization keeps absurd weights finite, so NaN never comes).
EXPLODED_LOSS_FACTOR = 3.0
METRIC_KEYS = EPOCH_METRICS + FIRST_EPOCH_METRICS  # logged per epoch; the one-off metrics are logged once


@dataclass
class EpochResult:
    loss_sum: float
    samples: int
    seconds: float  # the steps after the first ``warmup_steps``
    timed_samples: int  # samples of those steps
    warmup_seconds: float  # the first ``warmup_steps`` steps (torch.compile compiles there)
    diverged_step: int | None
    first_step_at: float | None  # time.time() when the first optimizer step finished


def reseed(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, rank: int, world: int, device: torch.device) -> float:
    """Top-1 accuracy in percent over the whole dataset; rank r evaluates samples r, r+world, ..."""
    was_training = model.training
    model.eval()
    x_all, y_all = dataset.tensors
    x_all, y_all = x_all[rank::world], y_all[rank::world]
    correct = 0
    for i in range(0, len(y_all), batch_size):
        x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    total_correct, total = all_reduce_sum([correct, len(y_all)], device)
    return 100.0 * total_correct / max(total, 1)


def calibration_batches(dataset, batch_size: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches from a seeded permutation of ``dataset``: the same on every rank."""
    x = dataset.tensors[0]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [x[order[i:i + batch_size]] for i in range(0, min(len(x), batch_size * count), batch_size)]


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


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                clip: float | None, device: torch.device, kill_at_step: int | None,
                warmup_steps: int = 0) -> EpochResult:
    """One pass over ``loader``; stops at the first step with a non-finite gradient norm.
    The first ``warmup_steps`` steps are timed apart (``warmup_seconds``)."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = timed_from = 0
    first_step_at = None
    start = warm_end = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: a real, abrupt worker death
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if not bool(torch.isfinite(norm)):  # identical on every rank: DDP all-reduced the gradients
            return EpochResult(float(loss_sum), samples, time.perf_counter() - warm_end, samples - timed_from,
                               warm_end - start, step, first_step_at)
        if clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm, foreach=True)
        optimizer.step()
        if first_step_at is None:
            first_step_at = time.time()
        loss_sum += loss.detach().double() * len(y)
        samples += len(y)
        if step + 1 == warmup_steps:
            warm_end, timed_from = time.perf_counter(), samples
    return EpochResult(float(loss_sum), samples, time.perf_counter() - warm_end, samples - timed_from,
                       warm_end - start, None, first_step_at)


def _log(session: Session, msg: str, name: str = "") -> None:
    if session.rank == 0:
        print(f"[{name}] {msg}" if name else msg, flush=True)


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
    if tracker is None:
        return _run_workflow(cfg, session, None, started_at, entered_at)
    try:
        final = _run_workflow(cfg, session, tracker, started_at, entered_at)
    except BaseException:
        tracker.close(raise_errors=False)
        raise
    tracker.close()
    return final


def _run_workflow(cfg: TrialConfig, session: Session, tracker: BackgroundRunLogger | None, started_at: float | None,
                  entered_at: float | None) -> dict[str, Any]:
    rank, world, device = session.rank, session.world_size, session.device
    name = cfg.tracking.run_name or ""

    def log(msg: str) -> None:
        _log(session, msg, name)

    qat = cfg.qat
    reseed(qat.seed, -1, 0)
    data = build_data(cfg.data)
    model = load_pretrained(cfg.model, data, cfg.model.checkpoint).to(device)
    dummy = data.train.tensors[0][:2].to(device)
    sim = QuantizationSimModel(model, dummy, cfg.quant_config())
    state = session.load_state()
    if state is not None and "final" in state:  # the trial had already ended: report it again
        log(f"trial already ended with status {state['final']['status']}")
        session.report(state["final"])
        return state["final"]
    extra: dict[str, Any] = {}
    if state is None:
        fp32_acc = evaluate(model, data.test, qat.eval_batch_size, rank, world, device)
        batches = [b.to(device) for b in calibration_batches(data.train, qat.batch_size, qat.calibration_batches, qat.seed)]
        sim.compute_encodings(lambda m, bs: [m(b) for b in bs], batches)
        local_digests = all_gather(digest(quantizer_state(sim.model)))
        broadcast_quantizer_state(sim.model)
        extra = {"calibration_digests": ",".join(all_gather(digest(quantizer_state(sim.model)))),
                 "local_calibration_digests": ",".join(local_digests)}
        ptq_acc = evaluate(sim.model, data.test, qat.eval_batch_size, rank, world, device)
        start_epoch, history = 0, []
        if tracker is not None:
            tracker.log_metrics({"fp32_acc": fp32_acc, "ptq_acc": ptq_acc, "val_samples": len(data.val),
                                 "test_samples": len(data.test)}, step=0)
        log(f"FP32 {fp32_acc:.2f}%  PTQ {ptq_acc:.2f}%  ({len(sim.activation_quantizers())} activation "
                      f"quantizers, {len(sim.param_quantizers())} weight quantizers, {world} worker(s))")
    else:
        sim.model.load_state_dict(state["model"])
        fp32_acc, ptq_acc = state["fp32_acc"], state["ptq_acc"]
        start_epoch, history = state["epoch"] + 1, state["history"]
        log(f"resumed from the checkpoint of epoch {state['epoch']}")
        if tracker is not None:  # epochs checkpointed before a crash but never logged
            logged = tracker.logged_steps("val_acc")
            for entry in history:
                if entry["epoch"] not in logged:
                    tracker.log_metrics({k: v for k, v in entry.items() if k in METRIC_KEYS}, step=entry["epoch"])

    nodes = sorted(set(all_gather(session.node_id)))
    if tracker is not None:
        tracker.set_tags({"qat.nodes": ",".join(nodes), "qat.world_size": str(world)})

    train_model: nn.Module = sim.model
    if distributed():
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(sim.model, device_ids=ids)
    if cfg.trainer.compile:
        train_model = torch.compile(train_model)
    optimizer = make_optimizer(cfg, sim)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=qat.lr_step_epochs, gamma=1.0 / qat.lr_gamma)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    per_worker_batch = max(1, qat.batch_size // world)
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=qat.seed)
    loader = DataLoader(data.train, batch_size=per_worker_batch, sampler=sampler,
                        pin_memory=device.type == "cuda")
    params = [p for p in sim.model.parameters() if p.requires_grad]
    fault = cfg.trainer.fault_injection

    base = {"fp32_acc": fp32_acc, "ptq_acc": ptq_acc, "resumed_from_epoch": start_epoch - 1}

    def checkpoint(epoch: int, final: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Rank 0's checkpoint state (None on other ranks); ``final`` marks the trial as ended."""
        if rank != 0:
            return None
        state = {"model": sim.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                 "fp32_acc": fp32_acc, "ptq_acc": ptq_acc, "rng": {"seed": qat.seed, "next_epoch": epoch + 1}}
        if final is not None:
            state["final"] = final
        return state

    for epoch in range(start_epoch, qat.epochs):
        epoch_start = time.perf_counter()
        reseed(qat.seed, epoch, rank)
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        kill_at = (len(loader) // 2 if fault.kill_rank == rank and fault.at_epoch == epoch and start_epoch == 0
                   else None)
        warmup = 1 if cfg.trainer.compile and epoch == start_epoch else 0
        result = train_epoch(train_model, loader, optimizer, params, qat.grad_clip_norm, device, kill_at, warmup)
        if result.diverged_step is not None:
            message = (f"training diverged: non-finite loss/gradients at epoch {epoch}, step "
                       f"{result.diverged_step} (qat.lr={qat.lr}, qat.optimizer={qat.optimizer}); "
                       "lower qat.lr or set qat.grad_clip_norm")
            log(message)
            final = {**base, "epoch": epoch, "val_acc": float("nan"), "status": "diverged", "error": message}
            session.report(final, checkpoint(epoch - 1, final))
            return final
        loss_sum, samples = all_reduce_sum([result.loss_sum, result.samples], device)
        exploded = loss_sum / max(samples, 1) > EXPLODED_LOSS_FACTOR * math.log(data.num_classes)
        if exploded:  # identical on every rank: the loss was all-reduced
            message = (f"training diverged: mean training loss {loss_sum / max(samples, 1):.3g} at epoch {epoch} is "
                       f"more than {EXPLODED_LOSS_FACTOR:g}x that of a uniform guess (qat.lr={qat.lr}, "
                       f"qat.optimizer={qat.optimizer}); lower qat.lr or set qat.grad_clip_norm")
            log(message)
            final = {**base, "epoch": epoch, "val_acc": float("nan"), "status": "diverged", "error": message}
            session.report(final, checkpoint(epoch - 1, final))
            return final
        train_seconds, timed_samples = all_reduce_sum([result.seconds, result.timed_samples], device)
        train_seconds = max(train_seconds / world, 1e-9)
        val_acc = evaluate(sim.model, data.val, qat.eval_batch_size, rank, world, device)
        scheduler.step()
        metrics = {**base, "epoch": epoch, "train_loss": loss_sum / max(samples, 1), "val_acc": val_acc, "lr": lr,
                   "epoch_time_s": time.perf_counter() - epoch_start, "samples_per_s": timed_samples / train_seconds}
        if warmup:
            metrics["compile_warmup_s"] = result.warmup_seconds
        if epoch == 0 and started_at is not None and result.first_step_at is not None:
            metrics["startup_s"] = result.first_step_at - started_at
            if entered_at is not None:
                metrics["worker_start_s"] = entered_at - started_at
        history.append(metrics)
        if tracker is not None:  # before the report: a sweep's scheduler may stop the trial there
            tracker.log_metrics({k: v for k, v in metrics.items() if k in METRIC_KEYS}, step=epoch)
        session.report({**metrics, **extra}, checkpoint(epoch))
        log(f"epoch {epoch + 1}/{qat.epochs}  loss {metrics['train_loss']:.4f}  val {val_acc:.2f}%  "
                      f"lr {lr:.3g}  {metrics['epoch_time_s']:.1f}s  {metrics['samples_per_s']:.0f} samples/s")

    test_acc = evaluate(sim.model, data.test, qat.eval_batch_size, rank, world, device)
    val_acc = history[-1]["val_acc"] if history else evaluate(sim.model, data.val, qat.eval_batch_size, rank, world,
                                                                 device)
    final = {**base, "epoch": qat.epochs - 1, "val_acc": val_acc, "test_acc": test_acc, "status": "finished",
             **extra}
    if rank == 0:
        export_dir = Path(cfg.output_dir) / "export"
        paths = sim.export(str(export_dir), cfg.export_prefix, dummy.cpu())
        final["export_dir"] = str(export_dir)
        final.update({f"export_{kind}": p for kind, p in paths.items()})
        if tracker is not None:
            tracker.log_metrics({"test_acc": test_acc}, step=max(qat.epochs - 1, 0))
            if cfg.tracking.log_artifacts:
                log_export(tracker, export_dir, cfg.export_prefix, sim.summary())
            tracker.flush()  # everything is in MLflow before the report that ends the trial
        log(f"test {test_acc:.2f}%  exported to {export_dir}")
    session.report(final, checkpoint(qat.epochs - 1, final))
    return final
