"""The check of an export against its simulation: onnxruntime on the exported files vs ``sim.model``.

``export_agreement(sim, paths, batches)`` runs ``QdqRunner`` (the float ONNX graph with the
encodings applied as QuantizeLinear/DequantizeLinear; it reads only the two files) and
``sim.model`` (eval mode, no grad) on the same batches and compares their first outputs (the
logits of a classifier or language model: the export's outputs are the model output's tensors in
order). Agreement shows the export is right: the encodings name the right tensors with the right
grids. Cost: one onnxruntime session build plus one forward of each per batch.

Dynamic per-token activations at 4 bits: the per-token nodes compute exactly the simulation's
quantizer (tests/quant/test_per_token_int4_export.py), but the whole-model outputs can differ by a
few 4-bit steps: re-quantizing a tensor already on a grid meets exact ties, which round by the last
bit of a token's scale, and onnxruntime's float ops (another summation order) move that bit. The
simulation differs as much from itself under a 2-ulp rescale of its input (12 dB at int4, 43 dB at
int8 on a tiny Llama; benchmarks/RESULTS.md), so such exports are checked at a lower
``qat.qdq_min_sqnr_db`` (``sweep=llm``: 15 dB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .ptq.sensitivity import sqnr_db
from .qdq import QdqRunner
from .sim import QuantizationSimModel, as_call


SQNR_CAP_DB = 300.0  # identical outputs: float32 noise is never below this


@dataclass(frozen=True)
class ExportAgreement:
    """onnxruntime (QDQ) against ``sim.model`` on the same inputs.

    ``top1``: fraction of rows (every position of every sample, argmax over the last axis) whose
    argmax agrees, in [0, 1]; ``sqnr_db``: the ONNX output's signal-to-noise ratio against the
    simulation's, dB (``inf``: identical); ``max_abs``: the largest absolute difference;
    ``rows``: how many rows ``top1`` counts; ``notes``: one line per weight whose Q/DQ onnxruntime
    has no kernel for (FP4: applied by ``onnx.reference`` instead, ``QdqRunner.notes``).
    """

    top1: float
    sqnr_db: float
    max_abs: float
    rows: int
    notes: tuple[str, ...] = ()

    def metrics(self, prefix: str = "qdq") -> dict[str, float]:
        """``{prefix}_agree_top1``, ``{prefix}_sqnr_db``, ``{prefix}_max_abs_diff``: numbers for a metrics
        log. Identical outputs (``sqnr_db`` inf) are logged as ``SQNR_CAP_DB`` so that JSON and MLflow
        hold a finite number."""
        return {f"{prefix}_agree_top1": self.top1, f"{prefix}_sqnr_db": min(self.sqnr_db, SQNR_CAP_DB),
                f"{prefix}_max_abs_diff": self.max_abs}

    def problem(self, min_sqnr_db: float) -> str | None:
        """Why this export disagrees with its simulation (SQNR below ``min_sqnr_db``), or None."""
        if self.sqnr_db >= min_sqnr_db:
            return None
        return (f"onnxruntime's QDQ run of the export disagrees with the simulation: output SQNR "
                f"{self.sqnr_db:.1f} dB < {min_sqnr_db:g} dB, top-1 agreement {100 * self.top1:.1f}% of "
                f"{self.rows} rows, max |diff| {self.max_abs:.3g}")


def _first_output(out: Any) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _ort_feeds(runner: QdqRunner, batch: Any) -> dict[str, np.ndarray]:
    """The graph's inputs from ``batch``: a dict by name (keys the graph dropped are left out), else in order."""
    if isinstance(batch, dict):
        missing = [n for n in runner.input_names if n not in batch]
        if missing:
            raise ValueError(f"the exported graph takes inputs {runner.input_names}; the batch has no {missing}")
        return {n: batch[n].detach().cpu().numpy() for n in runner.input_names}
    tensors = [t.detach().cpu().numpy() for t in pytree.tree_leaves(as_call(batch)) if isinstance(t, torch.Tensor)]
    return dict(zip(runner.input_names, tensors))


@torch.no_grad()
def export_agreement(sim: QuantizationSimModel, paths: dict[str, str], batches: list[Any]) -> ExportAgreement:
    """Compare onnxruntime on ``paths["onnx"]`` + ``paths["encodings"]`` (what ``sim.export`` returns)
    with ``sim.model`` on ``batches`` (each what the model is called with: a tensor, a tuple, or a dict
    of keyword tensors; any device). ``sim.model``'s train/eval mode is restored afterwards."""
    if not batches:
        raise ValueError("export_agreement needs at least one batch of model inputs")
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    device = next((p.device for p in sim.model.parameters()), torch.device("cpu"))
    was_training = sim.model.training
    sim.model.eval()
    ours, theirs = [], []
    try:
        for batch in batches:
            theirs.append(torch.from_numpy(np.asarray(runner.run(**_ort_feeds(runner, batch))[0])).float())
            args, kwargs = as_call(pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, batch))
            ours.append(_first_output(sim.model(*args, **kwargs)).float().cpu())
    finally:
        sim.model.train(was_training)
    for a, b in zip(ours, theirs):
        if a.shape != b.shape:
            raise ValueError(f"onnxruntime's first output has shape {tuple(b.shape)}, sim.model's {tuple(a.shape)}")
    agree = [(a.argmax(-1) == b.argmax(-1)).reshape(-1) for a, b in zip(ours, theirs)]
    matches = torch.cat(agree)
    return ExportAgreement(top1=float(matches.float().mean()), sqnr_db=sqnr_db(ours, theirs),
                           max_abs=max(float((a - b).abs().max()) for a, b in zip(ours, theirs)),
                           rows=int(matches.numel()), notes=tuple(runner.notes))
