"""Quantized recurrent layers: every ``weight_ih_l*`` / ``weight_hh_l*`` (and ``weight_hr_l*``)
per gate row (axis 0); biases stay float; outputs (sequence output, final states) quantized.

A bidirectional layer's forward and ``_reverse`` weights share one quantizer, applied to the
two stacked (``[2, rows, cols]``, rows on axis 1): ONNX's LSTM/GRU/RNN ops hold both directions
in one tensor, and one tensor has one encoding.

The gates, cell state and hidden state inside the recurrence are one fused kernel
(``torch._VF.lstm``): they stay float, as on targets that run the recurrence as one op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..granularity import LINEAR, STACKED_RNN
from .registry import QuantizedModule, register


class _QuantizedRNNBase(QuantizedModule):
    def quantized_param_names(self) -> dict[str, int]:
        return {name: LINEAR for name in self._flat_weights_names if name.startswith("weight_")}

    def quantized_param_groups(self) -> list[tuple[tuple[str, ...], int]]:
        names = [n for n in self._flat_weights_names if n.startswith("weight_") and not n.endswith("_reverse")]
        if not self.bidirectional:
            return [((n,), LINEAR) for n in names]
        return [((n, f"{n}_reverse"), STACKED_RNN) for n in names]

    def float_forward(self, *args: Any, **kwargs: Any) -> Any:
        float_weights = self._flat_weights
        weights = dict(zip(self._flat_weights_names, float_weights))
        holder = self._modules.get("param_quantizers")
        for names, _ in self.quantized_param_groups():
            if holder is None or names[0] not in holder:
                continue
            quantizer = holder[names[0]]
            if len(names) == 1:
                weights[names[0]] = quantizer(weights[names[0]])
            else:
                stacked = quantizer(torch.stack([weights[n] for n in names]))
                weights.update(zip(names, stacked.unbind(0)))
        self._flat_weights = [weights[n] for n in self._flat_weights_names]
        try:
            return self.FLOAT_CLASS.forward(self, *args, **kwargs)
        finally:
            self._flat_weights = float_weights


@register(nn.RNN)
class QuantizedRNN(_QuantizedRNNBase, nn.RNN):
    pass


@register(nn.LSTM)
class QuantizedLSTM(_QuantizedRNNBase, nn.LSTM):
    pass


@register(nn.GRU)
class QuantizedGRU(_QuantizedRNNBase, nn.GRU):
    pass
