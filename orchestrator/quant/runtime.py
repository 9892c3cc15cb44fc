"""Running ``sim.model``: functional ops quantized where the model's own code calls them.

``sim.model`` keeps the original model's classes, call convention and return structure.
Quantized layers quantize themselves (``layers/``). For the rest of the code (``x + y``,
``torch.matmul``, ``F.softmax`` in any module's ``forward``), the root's ``forward`` runs
inside ``FunctionalQuantMode``, a ``TorchFunctionMode``: each module that ran such ops during
capture pushes a *frame* when it is called (a forward pre-hook) and pops it when it returns;
the mode counts the ops of the innermost frame by canonical name and applies the quantizers
planned for ``(op, occurrence)``, exactly the keys capture recorded. Parameters that the code
passes straight to an op go through their quantizer first. Quantizers run with torch-function
handling off, so their own arithmetic is never counted.

``torch.compile`` traces the mode, the hooks and the frames like any Python (no graph break).
Frames reference the modules they belong to through module attributes, so a deep copy of
``sim.model`` keeps working on its own copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .attention_math import quantized_sdpa
from .ops import canonical_name

RUNTIME_ATTR = "_qsim_runtime"
TABLE_ATTR = "_qsim_sites"


class SiteTable:
    """The functional sites of one module: ``(op, occurrence) -> site`` and its direct parameters' quantizers."""

    def __init__(self, sites: dict[tuple[str, int], Any], params: dict[int, nn.Module]) -> None:
        self.sites = sites
        self.params = params  # id(parameter) -> quantizer

    def substitute(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        params = self.params
        args = tuple(params[id(a)](a) if isinstance(a, nn.Parameter) and id(a) in params else a for a in args)
        if kwargs:
            kwargs = {k: params[id(v)](v) if isinstance(v, nn.Parameter) and id(v) in params else v
                      for k, v in kwargs.items()}
        return args, kwargs


class OutputSite:
    """Quantizes the float outputs of one op (leaf index -> quantizer)."""

    def __init__(self, quantizers: dict[int, nn.Module]) -> None:
        self.quantizers = quantizers

    def __call__(self, func, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            q = self.quantizers.get(0)
            if q is None:
                return out
            if args and out is args[0]:  # in place: the caller may keep using the mutated tensor
                return out.copy_(q(out.clone()))
            return q(out)
        leaves, spec = pytree.tree_flatten(out)
        leaves = [self.quantizers[i](t) if i in self.quantizers else t for i, t in enumerate(leaves)]
        return pytree.tree_unflatten(leaves, spec)


class SdpaSite:
    """``F.scaled_dot_product_attention`` replaced by its quantized math (``attention_math``)."""

    def __init__(self, quantizers: nn.ModuleDict) -> None:
        self.quantizers = quantizers

    def __call__(self, func, args: tuple, kwargs: dict) -> Any:
        return quantized_sdpa(self.quantizers, *args, **kwargs)


class SimRuntime:
    """Per-simulation state: the frame stack, the input quantizers, the model's float ``forward``."""

    def __init__(self, float_forward, positional: list[str], inputs: dict[str, dict[int, nn.Module]]) -> None:
        self.stack: list[tuple[SiteTable, dict[str, int]] | None] = []
        self.float_forward = float_forward
        self.positional = positional
        self.inputs = inputs  # argument name -> {leaf index: quantizer} (leaf 0 for a tensor argument)

    def quantize_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.inputs:
            return args, kwargs
        names = self.positional
        args = tuple(self._quantize(names[i] if i < len(names) else f"input_{i}", a) for i, a in enumerate(args))
        kwargs = {k: self._quantize(k, v) for k, v in kwargs.items()}
        return args, kwargs

    def _quantize(self, name: str, value: Any) -> Any:
        quantizers = self.inputs.get(name)
        if not quantizers:
            return value
        if isinstance(value, torch.Tensor):
            return quantizers[0](value) if 0 in quantizers and value.is_floating_point() else value
        leaves, spec = pytree.tree_flatten(value)
        leaves = [quantizers[i](t) if i in quantizers and isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for i, t in enumerate(leaves)]
        return pytree.tree_unflatten(leaves, spec)


class FunctionalQuantMode(TorchFunctionMode):
    """Applies the innermost frame's sites to the ops the model's code calls."""

    def __init__(self, runtime: SimRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stack = self.runtime.stack
        frame = stack[-1] if stack else None
        if frame is None:
            return func(*args, **kwargs)
        table, counts = frame
        if table.params:
            args, kwargs = table.substitute(args, kwargs)
        op = canonical_name(func)
        if op is None:
            return func(*args, **kwargs)
        k = counts.get(op, 0)
        counts[op] = k + 1
        site = table.sites.get((op, k))
        if site is None:
            return func(*args, **kwargs)
        return site(func, args, kwargs)


def push_frame(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: ``module``'s ops count in a frame of their own (None: not quantized)."""
    table = module._qsim_sites
    module._qsim_runtime.stack.append(None if table is None else (table, {}))


def pop_frame(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook pairing ``push_frame``."""
    module._qsim_runtime.stack.pop()


def pop_frame_quantize_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook of a leaf module (run as written): pop its frame, quantize its outputs."""
    module._qsim_runtime.stack.pop()
    quantizers = module.output_quantizers
    leaves, spec = pytree.tree_flatten(output)
    leaves = [quantizers[str(i)](t) if str(i) in quantizers else t for i, t in enumerate(leaves)]
    return pytree.tree_unflatten(leaves, spec)


def root_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``forward`` of ``sim.model``: quantize the inputs, run the model's own forward in the mode
    with the root's frame on a fresh stack (frames left by an exception are dropped)."""
    runtime: SimRuntime = self._qsim_runtime
    args, kwargs = runtime.quantize_inputs(args, kwargs)
    table = self._qsim_sites
    stack = runtime.stack
    stack.clear()
    stack.append(None if table is None else (table, {}))
    try:
        with FunctionalQuantMode(runtime):
            return runtime.float_forward(self, *args, **kwargs)
    finally:
        stack.clear()


def make_root_class(cls: type) -> type:
    """A subclass of the model's class whose ``forward`` is ``root_forward`` (``isinstance`` still holds)."""
    return type(cls.__name__, (cls,), {"forward": root_forward, "__module__": cls.__module__,
                                       "_qsim_float_class": cls})
