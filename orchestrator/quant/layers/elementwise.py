"""Layers without quantized parameters whose outputs are quantized (norms, activations, average
pooling). Layers that only move or select values already on a grid (dropout, max pooling,
reshapes, padding, identity) are not registered: their code runs ops that placement treats as
data movement (``ops.PASS_THROUGH``), so they get no quantizer.

Norm parameters (1-D scale and shift) stay float, as biases do: targets fold them into the
norm's integer kernel.
"""

from __future__ import annotations

from torch import nn

from .registry import QuantizedModule, register

OUTPUT_QUANTIZED = (
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Upsample, nn.UpsamplingBilinear2d,
)
# Clipping activations: a conv/linear/BN/add feeding only one of these forms a supergroup with it.
RELU_LIKE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _output_quantized(float_class: type) -> type:
    cls = type(f"Quantized{float_class.__name__}", (QuantizedModule, float_class), {})
    return register(float_class)(cls)


QUANTIZED_OUTPUT_CLASSES = {c: _output_quantized(c) for c in OUTPUT_QUANTIZED}
