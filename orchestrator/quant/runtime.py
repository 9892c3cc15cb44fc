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

import warnings
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .attention_math import quantized_sdpa
from .ops import canonical_name, computes_on_floats

# Submodules the simulation adds to the model's modules: quantizer holders, never layers of the model.
QUANTIZER_CONTAINERS = frozenset({"param_quantizers", "output_quantizers", "functional_quantizers",
                                  "input_quantizers"})


class SiteTable:
    """The functional sites of one module: ``(op, occurrence) -> site`` and the quantizers of the
    parameters its code passes straight to ops, by qualified parameter name (from the root).

    Parameters are matched by name, not by the tensor object the simulation was built with: a wrapper
    may hold other objects under the same names (FSDP2 swaps in sharded, then gathered, parameters).
    """

    def __init__(self, sites: dict[tuple[str, int], Any], params: dict[str, nn.Module]) -> None:
        self.sites = sites
        self.params = params  # qualified parameter name -> quantizer

    def bind(self, root: nn.Module) -> tuple[tuple[nn.Parameter, nn.Module], ...]:
        """``(parameter as the model holds it now, its quantizer)`` pairs."""
        return tuple((root.get_parameter(name), q) for name, q in self.params.items())


def substitute(bound: tuple[tuple[nn.Parameter, nn.Module], ...], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with each bound parameter replaced by its quantized value."""
    def swap(a: Any) -> Any:
        if isinstance(a, nn.Parameter):
            for p, q in bound:
                if a is p:
                    return q(a)
        return a

    args = tuple(swap(a) for a in args)
    if kwargs:
        kwargs = {k: swap(v) for k, v in kwargs.items()}
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
        # frames: (sites, op counts, [bound parameters, filled on first use]) or None
        self.stack: list[tuple[SiteTable, dict[str, int], list] | None] = []
        self.root: nn.Module | None = None  # sim.model (parameters are looked up by name from it)
        self.float_forward = float_forward
        self.positional = positional
        self.inputs = inputs  # argument name -> {leaf index: quantizer} (leaf 0 for a tensor argument)
        self.warned_unmatched = False

    def quantize_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.inputs:
            return args, kwargs
        named = [(name, a) for name, a in zip(self.argument_names(len(args), kwargs), args)]
        if not self.warned_unmatched and not torch.compiler.is_compiling():
            self._warn_unmatched(named + list(kwargs.items()))
        args = tuple(self._quantize(name, a) for name, a in named)
        kwargs = {k: self._quantize(k, v) for k, v in kwargs.items()}
        return args, kwargs

    def argument_names(self, n_args: int, kwargs: dict) -> list[str]:
        """Names of ``n_args`` positional arguments: the forward's parameter names, then (a
        ``forward(*args)``) the captured inputs this call does not pass by keyword, in order."""
        names = self.positional
        spare = [n for n in self.inputs if n not in names and n not in kwargs]
        out = []
        for i in range(n_args):
            if i < len(names):
                out.append(names[i])
            elif i - len(names) < len(spare):
                out.append(spare[i - len(names)])
            else:
                out.append(f"input_{i}")
        return out

    def _warn_unmatched(self, named: list[tuple[str, Any]]) -> None:
        """Once: a float input that no input quantizer takes (a ``forward(*args)`` model called
        positionally after a dummy input given by keyword, or the other way round)."""
        stray = [n for n, v in named if n not in self.inputs and isinstance(v, torch.Tensor) and v.is_floating_point()]
        if stray:
            self.warned_unmatched = True
            warnings.warn(f"sim.model: float input(s) {stray} have no input quantizer (the dummy input named its "
                          f"inputs {sorted(self.inputs)}); call sim.model the way dummy_input did", stacklevel=3)

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
        table, counts, bound = frame
        if table.params:
            if not bound:  # bound inside the frame: after any wrapper's pre-forward hooks gathered them
                bound.append(table.bind(self.runtime.root))
            args, kwargs = substitute(bound[0], args, kwargs)
        op = canonical_name(func)
        if op is None or not computes_on_floats(args, kwargs):  # integer arithmetic: not counted (see ops.py)
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
    module._qsim_runtime.stack.append(None if table is None else (table, {}, []))


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
    stack.append(None if table is None else (table, {}, []))
    try:
        with FunctionalQuantMode(runtime):
            return runtime.float_forward(self, *args, **kwargs)
    finally:
        stack.clear()


def _layers(self: nn.Module) -> list[nn.Module]:
    return [m for name, m in self._modules.items() if name not in QUANTIZER_CONTAINERS]


def _sequential_getitem(self: nn.Module, idx: int | slice) -> nn.Module:
    layers = _layers(self)
    return nn.Sequential(*layers[idx]) if isinstance(idx, slice) else layers[idx]


def _own_copy(fn):
    """``fn`` with a code object of its own. ``torch.compile`` keeps compiled graphs, and its limit of
    8 recompilations, per code object: with one shared ``root_forward`` every further sim in a
    process (a reused Tune actor, a benchmark) recompiles it, and past the limit Dynamo silently
    runs it eagerly."""
    import types

    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def make_root_class(cls: type) -> type:
    """A subclass of the model's class whose ``forward`` is ``root_forward`` (``isinstance`` still holds).

    An ``nn.Sequential`` root iterates over its children in ``forward``: its subclass iterates,
    counts and indexes only the model's own layers, never the quantizer holders added to it.
    """
    attrs = {"forward": _own_copy(root_forward), "__module__": cls.__module__, "_qsim_float_class": cls}
    if issubclass(cls, nn.Sequential):
        attrs.update(__iter__=lambda self: iter(_layers(self)), __len__=lambda self: len(_layers(self)),
                     __getitem__=_sequential_getitem)
    return type(cls.__name__, (cls,), attrs)
