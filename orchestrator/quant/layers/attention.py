"""Quantized ``nn.MultiheadAttention``: projection weights quantized per output row, and the
attention computed in explicit ops so the simulation quantizes each intermediate like any
functional op: the q/k/v projections, the scaled scores, the softmax, the attention-weighted
values and the output projection (masks join the softmax, as in a fused softmax on target).

Configurations with ``bias_k``/``bias_v`` or ``add_zero_attn`` run torch's own
``F.multi_head_attention_forward`` on the quantized weights instead, one opaque op whose
internals stay float (``sim.summary()`` says so).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..granularity import LINEAR
from .registry import QuantizedModule, register


@register(nn.MultiheadAttention)
class QuantizedMultiheadAttention(QuantizedModule, nn.MultiheadAttention):
    QUANTIZED_PARAMS = {"in_proj_weight": LINEAR, "q_proj_weight": LINEAR, "k_proj_weight": LINEAR,
                        "v_proj_weight": LINEAR, "out_proj.weight": LINEAR}
    TRANSPARENT = True

    @property
    def explicit(self) -> bool:
        """True when the attention runs in explicit (individually quantized) ops."""
        return self.bias_k is None and self.bias_v is None and not self.add_zero_attn

    def float_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                      average_attn_weights=True, is_causal=False):
        if not self.explicit:
            return self._opaque_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights, is_causal)
        batched = query.dim() == 3
        if not batched:  # [L, E] -> [1, L, E]
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        elif not self.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        mask = self._merged_mask(attn_mask, key_padding_mask, query)
        b, tgt, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q = q.reshape(b, tgt, heads, head_dim).transpose(1, 2)
        k = k.reshape(b, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.reshape(b, v.shape[1], heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(F.dropout(probs, self.dropout, self.training), v)
        out = out.transpose(1, 2).reshape(b, tgt, embed)
        out = F.linear(out, self.qparam("out_proj.weight"), self.out_proj.bias)
        weights = None
        if need_weights:
            weights = probs.mean(dim=1) if average_attn_weights else probs
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value):
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.qparam("in_proj_weight").chunk(3)
        else:
            wq, wk, wv = (self.qparam(n) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _merged_mask(self, attn_mask, key_padding_mask, query):
        """One additive float mask ``[B or 1, H or 1, L, S]`` (True in a bool mask: not allowed)."""
        mask = None
        if attn_mask is not None:
            mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                     target_type=query.dtype, check_other=False)
            if mask.dim() == 3:  # [B*H, L, S]
                mask = mask.reshape(query.shape[0], self.num_heads, mask.shape[-2], mask.shape[-1])
        if key_padding_mask is not None:
            kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                    other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                    target_type=query.dtype)
            kpm = kpm[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        return mask

    def _opaque_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                        is_causal):
        with torch._C.DisableTorchFunction():
            if self.batch_first and query.dim() == 3:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
            separate = not self._qkv_same_embed_dim
            out, weights = F.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads,
                None if separate else self.qparam("in_proj_weight"), self.in_proj_bias, self.bias_k, self.bias_v,
                self.add_zero_attn, self.dropout, self.qparam("out_proj.weight"), self.out_proj.bias,
                training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, use_separate_proj_weight=separate,
                q_proj_weight=self.qparam("q_proj_weight") if separate else None,
                k_proj_weight=self.qparam("k_proj_weight") if separate else None,
                v_proj_weight=self.qparam("v_proj_weight") if separate else None,
                average_attn_weights=average_attn_weights, is_causal=is_causal)
            if self.batch_first and query.dim() == 3:
                out = out.transpose(1, 0)
        return self.quantize_outputs((out, weights))
