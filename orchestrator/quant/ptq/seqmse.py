"""SeqMSE: each weight encoding chosen by the output error of its layer (AIMET's Sequential MSE).

For each target layer (``layers.py``) in model order, each output channel's clipping of its
weight range is searched over ``candidates`` ratios ``1/n, 2/n, ..., 1`` of its min-max range:
the weight is rounded to the nearest point of each candidate grid and the layer's output on
its inputs in the simulation as it is (earlier layers already set) is compared with the float
model's output on float inputs (after the ReLU that follows the layer, if one does). An output
channel depends on its own weight row only, so the search is exact per channel: each channel
keeps the ratio with the least squared error summed over samples and positions. Weights are
not changed; the quantizer is pinned to the chosen grid (``grid.pin_encoding``). Cheaper than
AdaRound (one forward per candidate, no training): AIMET's choice for large transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..granularity import reduce_blocks
from ..quantizer import encoding_from_range
from .grid import check_integer_grid, current_encoding, nearest, pin_encoding
from .layers import Layer, Run, collect, quantization_off, target_layers


@dataclass(frozen=True)
class SeqMseParams:
    """``candidates`` clipping ratios per channel, searched on the first ``num_batches``
    calibration batches (all when None)."""

    candidates: int = 20
    num_batches: int | None = None


def channel_minmax(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``w`` per channel along ``axis`` (``[C]``; ``[1]`` when ``axis`` is None)."""
    if axis is None:
        lo, hi = torch.aminmax(w)
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(w.movedim(axis, 0).reshape(w.shape[axis], -1), dim=1)


@torch.no_grad()
def search_layer(layer: Layer, x: torch.Tensor, target: torch.Tensor, candidates: int) -> torch.Tensor:
    """Choose ``layer``'s weight clipping per output channel (see the module docstring), pin it,
    and return the chosen ratio per channel (``[C]``)."""
    entry = layer.entry
    enc = current_encoding(entry)
    w = entry.param.detach()
    if enc.per_block:  # every block of a channel clipped by the channel's ratio (the output error is per channel)
        lo, hi = (t.float().cpu() for t in reduce_blocks(w, enc.block_scale_shape(tuple(w.shape))))
        per_channel = [-1 if d == enc.axis % w.dim() else 1 for d in range(w.dim())]
    else:
        lo, hi = (t.float().cpu() for t in channel_minmax(w, enc.axis))
        per_channel = [-1]
    ratios = [i / candidates for i in range(1, candidates + 1)]
    best_err = best_ratio = best_scale = best_offset = None
    for r in ratios:
        scale, offset = encoding_from_range(lo * r, hi * r, enc.bitwidth, enc.symmetric)
        cand = replace(enc, scale=scale, offset=offset)
        err = (layer.compute(x, nearest(w, cand)) - target).square()
        err = err.movedim(layer.out_channel_dim, 0).reshape(err.shape[layer.out_channel_dim], -1).sum(1).cpu()
        if enc.axis is None:
            err = err.sum().reshape(1)
        if best_err is None:
            best_err, best_ratio = err, torch.full_like(err, r)
            best_scale, best_offset = scale.clone(), offset.clone()
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
        better = better.reshape(per_channel)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    pin_encoding(entry, best_scale, best_offset)
    return best_ratio


def seqmse(sim, run: Run, batches: list, params: SeqMseParams | None = None,
           layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """SeqMSE on every target layer of ``sim`` (or those named in ``layers``), in model order.

    ``run(sim.model, batch)`` runs the model on one of ``batches``; ``sim`` must be calibrated.
    Returns the chosen clipping ratio per output channel (``[C]``) by layer name.
    """
    p = params or SeqMseParams()
    if p.candidates < 1:
        raise ValueError(f"candidates={p.candidates!r} must be an integer >= 1")
    data = batches if p.num_batches is None else batches[:p.num_batches]
    todo = target_layers(sim, layers)
    check_integer_grid({l.name: l.entry for l in todo}, "seqmse")
    with quantization_off(sim):
        targets = collect(sim, todo, run, data, inputs=False, outputs=True)
    chosen = {}
    for layer in todo:
        x = collect(sim, [layer], run, data)[layer.name]["input"]
        chosen[layer.name] = search_layer(layer, x, layer.activate(targets[layer.name]["output"]), p.candidates)
    return chosen
