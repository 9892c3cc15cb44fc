"""The layers PTQ steps work on, in the order the model runs them, and their inputs and outputs.

A *target layer* is a conv (1/2/3-d) or linear layer of ``sim.model`` whose weight has an
enabled quantizer of its own (not tied to another tensor). Layer data is collected by forward
hooks while ``run(sim.model, batch)`` is called on each batch: with every quantizer as it is
set (the inputs a quantized layer sees), or with quantization off (the float model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..build import ParamEntry

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Activations applied to a layer's output before reconstruction errors are measured (the
# layer's only consumer is one of these): what the next layer sees is after the activation.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "relu6": F.relu6}

Run = Callable[[nn.Module, Any], Any]
# Activation modules by the functional op name they compute (ReLU6 before its base class Hardtanh).
ACTIVATION_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"))


def op_name(node) -> str | None:
    """The functional op a graph node computes: its op for a function node; ``relu``/``relu6``/
    ``leaky_relu`` for an activation module (``nn.ReLU``, ...); else None."""
    if node.kind == "function":
        return node.op
    for cls, name in ACTIVATION_MODULES:
        if isinstance(node.module, cls):
            return name
    return None


@dataclass
class Layer:
    """A target layer: qualified name, module, weight quantizer entry, the activation after it."""

    name: str
    module: nn.Module
    entry: ParamEntry
    activation: str | None = None

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's op on input ``x`` with ``weight`` (bias as it is), then its activation."""
        m = self.module
        y = F.linear(x, weight, m.bias) if isinstance(m, nn.Linear) else m._conv_forward(x, weight, m.bias)
        return self.activate(y)

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        """The activation that follows the layer (identity when none does)."""
        return ACTIVATIONS[self.activation](y) if self.activation else y

    @property
    def out_channel_dim(self) -> int:
        """Dimension of the layer's output that holds its output channels (1 for conv, -1 for linear)."""
        return -1 if isinstance(self.module, nn.Linear) else 1


def captured_graph(sim):
    """The dataflow graph the simulation captured from the model (``capture.CapturedGraph``)."""
    return sim._built.graph


def target_layers(sim, names: list[str] | None = None) -> list[Layer]:
    """Target layers of ``sim`` in the order the model first runs them (``names``: only these)."""
    by_param = {n: e for e in sim.quantized_params().values() for n in e.names}
    graph = captured_graph(sim)
    out, seen = [], set()
    for node in graph.nodes:
        name, module = node.owner, node.module
        if node.kind != "module" or name in seen or not isinstance(module, LAYER_TYPES):
            continue
        seen.add(name)
        entry = by_param.get(f"{name}.weight" if name else "weight")
        if entry is None or len(entry.params) != 1 or not entry.quantizer.enabled:
            continue
        if names is not None and name not in names:
            continue
        consumers = node.consumers[0] if node.consumers else []
        act = None
        if len(consumers) == 1 and consumers[0] >= 0:
            nxt = graph.nodes[consumers[0]]
            act = op_name(nxt) if op_name(nxt) in ACTIVATIONS else None
        out.append(Layer(name, module, entry, act))
    return out


@contextmanager
def quantization_off(sim) -> Iterator[None]:
    """Every quantizer off inside; each one's own ``enabled`` flag restored after."""
    quantizers = list(sim.activation_quantizers().values()) + list(sim.param_quantizers().values())
    before = [q.enabled for q in quantizers]
    try:
        for q in quantizers:
            q.enabled = False
        yield
    finally:
        for q, flag in zip(quantizers, before):
            q.enabled = flag


@torch.no_grad()
def collect(sim, layers: list[Layer], run: Run, batches: list, *, inputs: bool = True,
            outputs: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer name: {"input": x, "output": y}}``: each layer's first input and its output over
    all ``batches``, concatenated along dim 0 (the batch). Eval mode; the mode is restored."""
    store: dict[str, dict[str, list[torch.Tensor]]] = {l.name: {"input": [], "output": []} for l in layers}

    def hook(name: str):
        def fn(module, args, output):
            if inputs:
                store[name]["input"].append(args[0].detach())
            if outputs:
                store[name]["output"].append(output.detach())
        return fn

    handles = [l.module.register_forward_hook(hook(l.name)) for l in layers]
    was_training = sim.model.training
    sim.model.eval()
    try:
        for batch in batches:
            run(sim.model, batch)
    finally:
        sim.model.train(was_training)
        for h in handles:
            h.remove()
    return {name: {k: torch.cat(v) for k, v in d.items() if v} for name, d in store.items()}
