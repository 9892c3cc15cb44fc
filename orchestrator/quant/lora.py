"""Absorbable LoRA adapters on a simulation's quantized Linear weights (QAT with LoRA).

    adapters = add_lora(sim, rank=4, alpha=8.0)      # base frozen, adapters (+ encodings) train
    ...fine-tune sim.model...
    merge_lora(sim)                                  # W <- W + (alpha/r) B @ A; sim.export does it too

Each target layer (a quantized ``nn.Linear`` with weight ``W [out, in]``) gets a ``LoraAdapter``
with ``A [r, in]`` (PEFT's init: Kaiming-uniform, ``a = sqrt(5)``, from a seeded generator, so
every rank draws the same) and ``B [out, r]`` (zeros). The layer's weight quantizer sees the
*effective weight* ``W_eff = W + (alpha / r) * B @ A`` (``LoraAdapter.forward``, the one place
this rule is written; ``QuantizedModule.qparam`` and ``ParamEntry.values`` call it), so the
forward is ``y = x @ Q(W_eff)^T + b``: NNCF's absorbable LoRA (``dequantize(quantize(W + B @ A))``,
``examples/llm_compression/torch/qat_with_lora``). Merging writes ``W_eff`` into ``W``, bit for
bit the tensor the quantizer saw, so the merged model computes exactly what the adapter model
computed, and its weight encodings (learned, or following the weights) are those of the merged
weights: the export holds no adapter. torchtune's QAT + LoRA (and ModelOpt's quantized PEFT
layers) keep the adapter as a float path beside the quantized base, ``Q(W) x + B A x``, which
cannot be merged without leaving the grid; that is not what this module does.

``B = 0`` at the start, so ``W_eff = W`` exactly and the calibrated simulation is unchanged.
Everything else of ``sim.model`` that is not a quantizer (weights, biases, norms, embeddings)
is frozen (``requires_grad=False``); learned encodings keep theirs.

Cost per target layer and step: one ``[out, r] @ [r, in]`` matmul and an add in the forward
(``r * out * in`` multiply-adds, against ``N * out * in`` for the layer on ``N`` rows), the
adapters' ``r * (out + in)`` parameters, gradients and optimizer state instead of ``out * in``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from .build import is_quantizer_key
from .errors import QuantConfigError
from .layers import QuantizedModule
from .layers.registry import LORA_ADAPTERS as ADAPTERS  # a target layer's ModuleDict, keyed like its quantizers


class LoraAdapter(nn.Module):
    """``A [rank, in_features]``, ``B [out_features, rank]`` and ``scale = alpha / rank``."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 generator: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        a = torch.empty(rank, in_features, dtype=like.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(a.to(like.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The effective weight ``W + scale * B @ A`` (``[out, in]``), what the quantizer sees."""
        return weight + self.scale * (self.B @ self.A)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, scale={self.scale:g}"


def lora_candidates(sim) -> dict[str, QuantizedModule]:
    """The layers LoRA can target: quantized ``nn.Linear`` layers whose weight has a quantizer of its
    own that only this layer applies (a tied weight, or one another module's code also passes to
    an op, e.g. MHA's ``out_proj.weight``, is left out: the adapter would not reach every use)."""
    entries = {id(e.param): e for e in sim.quantized_params().values()}
    out = {}
    for name, module in sim.model.named_modules():
        if not (isinstance(module, QuantizedModule) and isinstance(module, nn.Linear)):
            continue
        entry = entries.get(id(module.weight))
        if entry is not None and len(entry.names) == 1 and len(entry.params) == 1 and set(entry.owners) == {name}:
            out[name] = module
    return out


def add_lora(sim, rank: int, alpha: float, targets: Sequence[str] = ("*",), seed: int = 0) -> dict[str, LoraAdapter]:
    """Attach an adapter to every candidate layer whose name matches a pattern of ``targets``
    (``fnmatch`` on the module name, e.g. ``*.mlp.*``, ``*q_proj``) and freeze the rest of the model.

    Returns the adapters by layer name. Raises ``QuantConfigError`` for ``rank < 1``, a pattern that
    matches no candidate, or a simulation that has adapters already.
    """
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise QuantConfigError(f"lora.rank={rank!r} is not allowed; allowed: an integer >= 1")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise QuantConfigError(f"lora.alpha={alpha!r} is not allowed; allowed: a finite number > 0")
    if lora_adapters(sim):
        raise QuantConfigError("lora: this simulation has adapters already; merge_lora(sim) first")
    candidates = lora_candidates(sim)
    for pattern in targets:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            listed = ", ".join(list(candidates)[:6]) + (", ..." if len(candidates) > 6 else "")
            raise QuantConfigError(f"lora.targets pattern {pattern!r} matches no quantized Linear layer; "
                                   f"allowed: fnmatch patterns of their names: {listed or 'none'}")
    chosen = {n: m for n, m in candidates.items() if any(fnmatch.fnmatchcase(n, p) for p in targets)}
    for name, p in sim.model.named_parameters():
        if not is_quantizer_key(name):
            p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    entries = {id(e.param): e for e in sim.quantized_params().values()}
    adapters = {}
    for name, layer in chosen.items():
        w = layer.weight
        adapter = LoraAdapter(w.shape[0], w.shape[1], rank, float(alpha), generator, w)
        layer.add_module(ADAPTERS, nn.ModuleDict({"weight": adapter}))
        entries[id(w)].adapter = adapter
        adapters[name] = adapter
    return adapters


def lora_adapters(sim) -> dict[str, LoraAdapter]:
    """The adapters of ``sim.model`` by layer name (empty: none, or merged)."""
    return {name: m._modules[ADAPTERS]["weight"] for name, m in sim.model.named_modules()
            if isinstance(m, QuantizedModule) and ADAPTERS in m._modules}


@torch.no_grad()
def merge_lora(sim) -> int:
    """Write every adapter's effective weight into its layer's weight and remove the adapter (in
    place; the weights stay frozen). Returns how many were merged (0: none)."""
    entries = {id(e.param): e for e in sim.quantized_params().values()}
    merged = 0
    for name, module in sim.model.named_modules():
        if not isinstance(module, QuantizedModule) or ADAPTERS not in module._modules:
            continue
        w = module.weight
        w.copy_(module._modules[ADAPTERS]["weight"](w))
        del module._modules[ADAPTERS]
        entry = entries.get(id(w))
        if entry is not None:
            entry.adapter = None
        merged += 1
    return merged
