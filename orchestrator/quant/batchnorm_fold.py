"""Folding BatchNorm into the conv/linear layer that feeds it.

For ``y = BN(W x + b)`` with running statistics ``mu``, ``var``, affine ``gamma``, ``beta``:
``W' = W * gamma / sqrt(var + eps)`` (per output channel) and
``b' = (b - mu) * gamma / sqrt(var + eps) + beta``. After folding the BN node is gone from the
graph and its statistics stop updating, as on an integer target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class FoldedPair:
    """A layer (qualified name) and the BatchNorm that was folded into it."""

    layer: str
    batchnorm: str
    layer_had_bias: bool


def _calls(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


@torch.no_grad()
def fold_batchnorms(gm: fx.GraphModule) -> list[FoldedPair]:
    """Fold every BN whose only input is a conv/linear used nowhere else; edits ``gm`` in place.

    A pair is left unfolded when a module is called more than once, or when neither the layer
    nor the BN has a bias to hold the folded bias in the original architecture.
    """
    calls = _calls(gm.graph)
    folded: list[FoldedPair] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1:
            continue
        bn = gm.get_submodule(node.target)
        producer = node.args[0]
        if not isinstance(bn, BATCHNORMS) or not isinstance(producer, fx.Node):
            continue
        if producer.op != "call_module" or len(producer.users) != 1:
            continue
        layer = gm.get_submodule(producer.target)
        if type(layer) not in FOLDABLE_LAYERS or bn.running_mean is None:
            continue
        if calls[producer.target] != 1 or calls[node.target] != 1:
            continue
        if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
            continue
        if layer.bias is None and not bn.affine:
            continue  # the original architecture would have nowhere to hold the folded bias
        had_bias = layer.bias is not None
        _fold_into(layer, bn)
        folded.append(FoldedPair(producer.target, node.target, layer_had_bias=had_bias))
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()  # the folded BNs: their parameters must not linger (DDP, optimizers)
    gm.recompile()
    return folded


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(factor.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.detach().clone())
    else:
        layer.bias.copy_(new_bias)


def identity_batchnorm_state(bn_state: dict[str, torch.Tensor], eps: float, beta: torch.Tensor) -> dict[str, torch.Tensor]:
    """State of a BN that, in eval mode, adds ``beta`` and otherwise passes its input through.

    Used to write folded weights back into the original architecture: the conv holds the folded
    weight, the BN becomes ``x -> x + beta`` (``running_var = 1 - eps`` so ``var + eps = 1``).
    """
    out = dict(bn_state)
    out["weight"] = torch.ones_like(bn_state["running_mean"]) if "weight" in bn_state else None
    out["bias"] = beta.detach().clone() if "bias" in bn_state else None
    out["running_mean"] = torch.zeros_like(bn_state["running_mean"])
    out["running_var"] = torch.full_like(bn_state["running_var"], 1.0 - eps)
    return {k: v for k, v in out.items() if v is not None}
