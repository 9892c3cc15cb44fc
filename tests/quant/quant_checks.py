"""Measurements shared by the quant tests: calling a model on a batch of any form, SQNR,
calibration, a short range-learning run, export + onnxruntime agreement.

A *batch* is what a model is called with: a tensor, a tuple of positional tensors, or a dict
of keyword tensors (``{"input_ids": ..., "attention_mask": ...}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.quant import QdqRunner, QuantConfig, QuantizationSimModel
from orchestrator.tasks import feed, logits_of  # noqa: F401 (the tests import them from here)


def run_all(model: nn.Module, batches: list) -> None:
    """The ``forward_pass_callback`` of ``compute_encodings`` for batches of any form."""
    for b in batches:
        feed(model, b)


def numpy_inputs(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of numpy arrays for ``QdqRunner``."""
    if isinstance(batch, dict):
        return (), {k: v.numpy() for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(t.numpy() for t in batch), {}
    return (batch.numpy(),), {}


def sqnr_db(reference: torch.Tensor | np.ndarray, other: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``other`` against ``reference`` in dB."""
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    noise = ref - torch.as_tensor(np.asarray(other), dtype=torch.float64)
    return 10.0 * math.log10(float(ref.square().sum()) / max(float(noise.square().sum()), 1e-300))


def assert_compiles_like_eager(q: nn.Module, x: torch.Tensor, quantize_ops: int | None = None) -> None:
    """``q`` traces to one graph without a break (with exactly ``quantize_ops`` quantize-dequantize
    ops when given), and ``torch.compile(q, fullgraph=True)`` gives eager's forward and input
    gradient bit for bit."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    if quantize_ops is not None:
        ops = [n for g in explained.graphs for n in g.graph.nodes if "quantize_dequantize" in str(n.target)]
        assert len(ops) == quantize_ops
    compiled = torch.compile(q, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager, comp = q(xe), compiled(xc)
    assert torch.equal(eager, comp)
    g = torch.randn_like(eager)
    eager.backward(g)
    comp.backward(g)
    assert torch.equal(xe.grad, xc.grad)
    torch._dynamo.reset()


def calibrated(model: nn.Module, batches: list, **cfg: Any) -> QuantizationSimModel:
    """A sim of ``model`` (dummy input: the first batch) calibrated on ``batches``."""
    sim = QuantizationSimModel(model, batches[0], QuantConfig(**cfg))
    sim.compute_encodings(run_all, batches)
    return sim


@torch.no_grad()
def w8a8_sqnr(model: nn.Module, sim: QuantizationSimModel, held_out: list) -> float:
    """SQNR of ``sim.model``'s logits vs the float model's on ``held_out`` batches (eval mode)."""
    model.eval()
    sim.model.eval()
    ref = torch.cat([logits_of(feed(model, b)).reshape(-1) for b in held_out])
    out = torch.cat([logits_of(feed(sim.model, b)).reshape(-1) for b in held_out])
    return sqnr_db(ref, out)


def dominant_error(model: nn.Module, sim: QuantizationSimModel, held_out: list, top: int = 3) -> list[tuple[str, float]]:
    """The activation quantizers whose removal (alone) helps the output SQNR most: ``[(name, dB)]``."""
    base = w8a8_sqnr(model, sim, held_out)
    gains = []
    for name, q in sim.activation_quantizers().items():
        q.enabled = False
        gains.append((name, w8a8_sqnr(model, sim, held_out) - base))
        q.enabled = True
    return sorted(gains, key=lambda g: -g[1])[:top]


def two_plus_dim_params(model: nn.Module) -> set[str]:
    """Every name (tied parameters: each name) of a parameter of 2+ dims."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.dim() >= 2}


def quantized_param_names(sim: QuantizationSimModel) -> set[str]:
    """Every name of every quantized parameter (tied parameters: all their names)."""
    return {n for entry in sim.quantized_params().values() for n in entry.names}


def quantizer_counts(sim: QuantizationSimModel) -> dict[str, int]:
    """Quantizers by kind: weights (one per parameter tensor) and activations."""
    return {"weights": len(sim.param_quantizers()), "activations": len(sim.activation_quantizers())}


@dataclass
class RangeLearningRun:
    losses: list[float] = field(default_factory=list)
    collapsed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def range_learning_steps(sim: QuantizationSimModel, batches: list, loss_fn: Callable[[Any, Any], torch.Tensor],
                         targets: list, steps: int = 20, lr: float = 1e-3,
                         encoding_lr: float = 1e-3) -> RangeLearningRun:
    """``steps`` training steps of ``sim.model`` with the trial's default optimizer: Adam at ``lr``
    for the weights, the encodings in their own group (``encoding_lr``, no weight decay), cycling
    over ``batches``; the collapse watch (``watch_encodings``) is on."""
    import warnings

    from orchestrator.quant import EncodingCollapseWarning

    opt = torch.optim.Adam([
        {"params": sim.model_parameters(), "lr": lr, "weight_decay": 0.0},
        {"params": sim.quantizer_parameters(), "lr": encoding_lr, "weight_decay": 0.0},
    ])
    handle = sim.watch_encodings(opt)
    run = RangeLearningRun()
    sim.model.train()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EncodingCollapseWarning)
            for step in range(steps):
                i = step % len(batches)
                opt.zero_grad()
                loss = loss_fn(feed(sim.model, batches[i]), targets[i])
                loss.backward()
                opt.step()
                run.losses.append(float(loss))
        run.warnings = [str(w.message) for w in caught if issubclass(w.category, EncodingCollapseWarning)]
    finally:
        handle.remove()
        sim.model.eval()
    run.collapsed = sim.collapsed_quantizers()
    return run


def classification_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(out), labels)


def next_token_loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = logits_of(out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@dataclass
class OrtAgreement:
    top1: float  # fraction of rows whose argmax agrees
    sqnr: float  # dB of onnxruntime's logits against sim.model's
    max_abs: float


@torch.no_grad()
def ort_agreement(sim: QuantizationSimModel, paths: dict[str, str], batch: Any) -> OrtAgreement:
    """onnxruntime on the exported files (QDQ applied) vs ``sim.model`` on ``batch`` (eval mode)."""
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    args, kwargs = numpy_inputs(batch)
    theirs = runner(*args, **kwargs)
    sim.model.eval()
    ours = logits_of(feed(sim.model, batch)).numpy()
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    top1 = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    return OrtAgreement(top1, sqnr_db(ours, theirs), float(np.abs(ours - theirs).max()))
