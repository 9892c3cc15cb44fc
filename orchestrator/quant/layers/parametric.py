"""Quantized layers with weights: conv, transposed conv, linear, embedding, HF ``Conv1D``.

Weights are quantized per output channel: axis 0 for Conv/Linear/Embedding weights
(``[C_out, C_in, *k]``, ``[C_out, C_in]``, ``[num_embeddings, dim]``), axis 1 for transposed
convolutions (``[C_in, C_out / groups, *k]``) and Hugging Face's ``Conv1D`` (``[nx, nf]``).
Biases stay float. Blocks (per-block granularity) run along the input axis: 1 for
Conv/Linear/Embedding, 0 for transposed convolutions and ``Conv1D`` (``granularity.WeightAxes``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..granularity import LINEAR, TRANSPOSED
from .registry import QuantizedModule, register


class _QuantizedConv(QuantizedModule):
    QUANTIZED_PARAMS = {"weight": LINEAR}

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.qparam("weight"), self.bias)


@register(nn.Conv1d)
class QuantizedConv1d(_QuantizedConv, nn.Conv1d):
    pass


@register(nn.Conv2d)
class QuantizedConv2d(_QuantizedConv, nn.Conv2d):
    pass


@register(nn.Conv3d)
class QuantizedConv3d(_QuantizedConv, nn.Conv3d):
    pass


class _QuantizedConvTranspose(QuantizedModule):
    QUANTIZED_PARAMS = {"weight": TRANSPOSED}
    CONV_FN = staticmethod(F.conv_transpose2d)
    SPATIAL_DIMS = 2

    def float_forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              self.SPATIAL_DIMS, self.dilation)
        return self.CONV_FN(x, self.qparam("weight"), self.bias, self.stride, self.padding, output_padding,
                            self.groups, self.dilation)


@register(nn.ConvTranspose1d)
class QuantizedConvTranspose1d(_QuantizedConvTranspose, nn.ConvTranspose1d):
    CONV_FN = staticmethod(F.conv_transpose1d)
    SPATIAL_DIMS = 1


@register(nn.ConvTranspose2d)
class QuantizedConvTranspose2d(_QuantizedConvTranspose, nn.ConvTranspose2d):
    CONV_FN = staticmethod(F.conv_transpose2d)
    SPATIAL_DIMS = 2


@register(nn.ConvTranspose3d)
class QuantizedConvTranspose3d(_QuantizedConvTranspose, nn.ConvTranspose3d):
    CONV_FN = staticmethod(F.conv_transpose3d)
    SPATIAL_DIMS = 3


@register(nn.Linear)
class QuantizedLinear(QuantizedModule, nn.Linear):
    """Linear on inputs of any rank (``[..., in_features]``)."""

    QUANTIZED_PARAMS = {"weight": LINEAR}

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qparam("weight"), self.bias)


@register(nn.Embedding)
class QuantizedEmbedding(QuantizedModule, nn.Embedding):
    """Rows of the quantized table: the output is already on the weight's grid (no output quantizer)."""

    QUANTIZED_PARAMS = {"weight": LINEAR}
    PASS_THROUGH = True

    def float_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qparam("weight"), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


@register("transformers.pytorch_utils.Conv1D")
class QuantizedHFConv1D(QuantizedModule):
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``[nx, nf]``."""

    QUANTIZED_PARAMS = {"weight": TRANSPOSED}

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.qparam("weight"))
        return x.view(size_out)
