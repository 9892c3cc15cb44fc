"""Folding BatchNorm into the conv/linear layer that feeds it.

For ``y = BN(W x + b)`` with running statistics ``mu``, ``var``, affine ``gamma``, ``beta``:
``W' = W * gamma / sqrt(var + eps)`` (per output channel) and
``b' = (b - mu) * gamma / sqrt(var + eps) + beta``. After folding the BN module is an identity
and its statistics stop updating, as on an integer target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FoldedPair:
    """A layer (qualified name) and the BatchNorm that was folded into it."""

    layer: str
    batchnorm: str
    layer_had_bias: bool


@torch.no_grad()
def fold_batchnorms(model: nn.Module, pairs: list[tuple[str, str]]) -> list[FoldedPair]:
    """Fold each ``(layer, batchnorm)`` pair in place; the BatchNorm becomes an ``nn.Identity``."""
    folded = []
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        had_bias = layer.bias is not None
        _fold_into(layer, bn)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
        folded.append(FoldedPair(layer_name, bn_name, had_bias))
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
