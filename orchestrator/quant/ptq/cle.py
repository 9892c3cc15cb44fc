"""Cross-layer equalization with high-bias absorption (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction"), on ``sim.model``'s float weights.

Run it after the simulation is built (BatchNorms already folded into their layers) and before
``compute_encodings``. A *pair* is a conv/linear layer ``A`` whose output reaches exactly one
conv/linear layer ``B`` and nothing else, through at most one positively homogeneous activation
(``relu``, ``leaky_relu``: ``f(x/s) = f(x)/s`` for ``s > 0``) and ops that only move values
(flatten, view, reshape, dropout, max pooling; a folded BatchNorm is an identity). Output
channel ``i`` of ``A`` is divided by ``s_i`` (weight row and bias) and the matching input
channel(s) of ``B`` multiplied by ``s_i`` (a flatten from conv channels into a linear layer maps
channel ``i`` to ``k`` consecutive features), with ``s_i = sqrt(r1_i / r2_i)`` where ``r1_i`` is
the largest ``|weight|`` of ``A``'s channel and ``r2_i`` of ``B``'s. Both then have range
``sqrt(r1_i r2_i)``; the float function is unchanged. Chains (``A -> B -> C``) are swept until
the scales stop changing.

High-bias absorption (with calibration data, through ReLU-like activations only): where ``A``'s
pre-activation ``z_i`` is at least ``c_i > 0`` on every calibration sample, ``relu(z - c) =
relu(z) - c``, so ``c`` moves from ``A``'s bias into ``B``'s (``b_B += W_B c``), shrinking the
activation range that must be quantized. Only where ``B`` has a bias and adds no padding
(padding would see ``0`` where the shifted input is ``-c``): linear layers, unpadded convs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Layer, Run, captured_graph, collect, op_name, quantization_off

EQUALIZE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
HOMOGENEOUS = frozenset({"relu", "leaky_relu"})
MOVES = frozenset({"flatten", "view", "reshape", "dropout", "contiguous", "max_pool1d", "max_pool2d",
                   "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d", "max_pool1d_with_indices",
                   "max_pool2d_with_indices", "max_pool3d_with_indices"})
RESHAPES = frozenset({"flatten", "view", "reshape"})


@dataclass
class Pair:
    """``first``'s output channels feed ``second``'s input channels, ``group`` inputs per channel."""

    first: str
    second: str
    activation: str | None
    group: int
    reshaped: bool


def _equalizable(module: nn.Module) -> bool:
    return isinstance(module, EQUALIZE_TYPES) and getattr(module, "groups", 1) == 1


def find_pairs(sim) -> list[Pair]:
    """Every equalizable pair of ``sim.model`` (see the module docstring), in model order."""
    graph = captured_graph(sim)
    folded = {p.batchnorm for p in sim.folded}
    pairs, seen = [], set()
    for node in graph.nodes:
        if node.kind != "module" or node.owner in seen or not _equalizable(node.module):
            continue
        seen.add(node.owner)
        activation, reshaped, cur = None, False, node
        while True:
            if len(cur.consumers) != 1 or len(cur.consumers[0]) != 1 or cur.consumers[0][0] < 0:
                break
            nxt = graph.nodes[cur.consumers[0][0]]
            op = op_name(nxt)
            if nxt.kind == "module" and nxt.owner in folded:
                cur = nxt  # a folded BatchNorm: an identity now
                continue
            if nxt.kind == "module" and op is None:
                if _equalizable(nxt.module) and nxt.inputs and nxt.inputs[0].node == cur.index:
                    c_out = node.module.weight.shape[0]
                    c_in = nxt.module.weight.shape[1]
                    group = c_in // c_out if c_in % c_out == 0 else 0
                    if group == 1 or (group > 1 and reshaped and isinstance(nxt.module, nn.Linear)
                                      and not isinstance(node.module, nn.Linear)):
                        pairs.append(Pair(node.owner, nxt.owner, activation, group, reshaped))
                break
            if op in HOMOGENEOUS and activation is None:
                activation = op
            elif op in MOVES:
                reshaped = reshaped or op in RESHAPES
            else:
                break
            cur = nxt
    return pairs


def _in_ranges(w: torch.Tensor, group: int) -> torch.Tensor:
    """Largest ``|w|`` per input channel of ``w`` (dim 1), ``group`` consecutive inputs per channel."""
    per_input = w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)
    return per_input.reshape(-1, group).amax(dim=1)


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).amax(dim=1)


def _in_shape(w: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (w.dim() - 2)


def _out_shape(w: torch.Tensor) -> list[int]:
    return [-1] + [1] * (w.dim() - 1)


@torch.no_grad()
def _scale_pair(model: nn.Module, pair: Pair) -> float:
    """Equalize one pair in place; returns the largest ``|log s_i|`` applied."""
    a, b = model.get_submodule(pair.first), model.get_submodule(pair.second)
    r1, r2 = _out_ranges(a.weight), _in_ranges(b.weight, pair.group)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
    a.weight.div_(s.reshape(_out_shape(a.weight)))
    if a.bias is not None:
        a.bias.div_(s)
    b.weight.mul_(s.repeat_interleave(pair.group).reshape(_in_shape(b.weight)))
    return float(s.log().abs().max())


def _absorbable(model: nn.Module, pair: Pair) -> bool:
    a, b = model.get_submodule(pair.first), model.get_submodule(pair.second)
    if pair.activation != "relu" or a.bias is None or b.bias is None:
        return False
    if isinstance(b, nn.Linear):
        return True
    return isinstance(b.padding, tuple) and all(p == 0 for p in b.padding)


@torch.no_grad()
def _absorb(model: nn.Module, pair: Pair, lowest: torch.Tensor) -> torch.Tensor:
    """Move ``c = max(lowest, 0)`` (``[C]``, the smallest pre-activation per channel) from the
    first layer's bias into the second's; returns ``c``."""
    a, b = model.get_submodule(pair.first), model.get_submodule(pair.second)
    c = lowest.clamp(min=0).to(a.bias)
    a.bias.sub_(c)
    per_input = c.repeat_interleave(pair.group)
    w = b.weight.reshape(b.weight.shape[0], b.weight.shape[1], -1).sum(dim=2)  # [out, in]
    b.bias.add_(w @ per_input)
    return c


def equalize(sim, run: Run | None = None, batches: list | None = None, *, max_sweeps: int = 100,
             tolerance: float = 1e-6) -> dict[str, float]:
    """Cross-layer equalization of ``sim.model`` and, with ``run``/``batches`` (the calibration
    data, ``run(sim.model, batch)``), high-bias absorption. Returns ``{"pairs": n, "sweeps": n,
    "absorbed": sum of c}``. Call before ``compute_encodings`` (encodings calibrated before would
    no longer fit the weights)."""
    pairs = find_pairs(sim)
    model = sim.model
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        change = max((_scale_pair(model, p) for p in pairs), default=0.0)
        if change < tolerance:
            break
    absorbed = 0.0
    todo = [p for p in pairs if _absorbable(model, p)]
    if run is not None and batches and todo:
        for pair in todo:  # in model order: an absorption changes what later layers see
            layer = Layer(pair.first, model.get_submodule(pair.first), None)
            with quantization_off(sim):
                z = collect(sim, [layer], run, batches, inputs=False, outputs=True)[pair.first]["output"]
            dim = -1 if isinstance(layer.module, nn.Linear) else 1
            lowest = z.movedim(dim, 0).reshape(z.shape[dim], -1).amin(dim=1)
            absorbed += float(_absorb(model, pair, lowest).sum())
    return {"pairs": len(pairs), "sweeps": sweeps, "absorbed": absorbed}
