"""``F.scaled_dot_product_attention`` as the ops it stands for, each output quantized.

A fused attention kernel hides the scores, the softmax and the weighted values that an integer
target computes as separate ops. The simulation runs the math instead (PyTorch's reference
formulation):

    scores = (Q @ K^T) * scale            quantized ("scores")
    scores = scores + mask (or -inf)      joins the softmax (a fused masked softmax on target)
    probs  = softmax(scores, dim=-1)      quantized ("probs"), then dropout; a fully masked row: 0
    out    = probs @ V                    quantized ("output")

Shapes: ``Q [..., L, E]``, ``K [..., S, E]``, ``V [..., S, Ev]`` -> ``[..., L, Ev]``; with
``enable_gqa`` K and V have fewer heads (dim -3) and are repeated to match. Cost: the
``[..., L, S]`` score matrix is materialised, as in the math backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

SDPA_PARTS = ("scores", "probs", "output")


def quantized_sdpa(quantizers: Mapping[str, torch.nn.Module], query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """The same arguments and result as ``F.scaled_dot_product_attention``; ``quantizers`` maps
    each of ``SDPA_PARTS`` to the quantizer of that intermediate (missing: left float)."""
    length, source = query.size(-2), key.size(-2)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    if "scores" in quantizers:
        scores = quantizers["scores"](scores)
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(allowed.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if is_causal or (attn_mask is not None and attn_mask.dtype == torch.bool):
        # A row with every key masked (padding under a sliding window): zeros, not NaN, as
        # PyTorch's own SDPA (``_safe_softmax``) gives.
        probs = torch.where((scores == float("-inf")).all(-1, keepdim=True), 0.0, probs)
    if "probs" in quantizers:
        probs = quantizers["probs"](probs)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = torch.matmul(probs, value)
    if "output" in quantizers:
        out = quantizers["output"](out)
    return out
