"""Quantized recurrent layers: every ``weight_ih_l*`` / ``weight_hh_l*`` (and ``weight_hr_l*``)
per gate row (axis 0); biases stay float; outputs (sequence output, final states) quantized.

The gates, cell state and hidden state inside the recurrence are one fused kernel
(``torch._VF.lstm``): they stay float, as on targets that run the recurrence as one op.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import QuantizedModule, register


class _QuantizedRNNBase(QuantizedModule):
    def quantized_param_names(self) -> dict[str, int]:
        return {name: 0 for name in self._flat_weights_names if name.startswith("weight_")}

    def float_forward(self, *args: Any, **kwargs: Any) -> Any:
        float_weights = self._flat_weights
        self._flat_weights = [self.qparam(n) if n.startswith("weight_") else w
                              for n, w in zip(self._flat_weights_names, float_weights)]
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
