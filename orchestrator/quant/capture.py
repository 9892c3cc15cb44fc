"""Graph capture: run the model once on ``dummy_input`` and record what computes what.

The model runs eagerly, as written (any Python: data-dependent control flow, ``*args``
decorators, Hugging Face's output classes), under a recording ``TorchFunctionMode`` and
forward hooks on every module. The result is a dataflow graph (``CapturedGraph``) whose nodes
are the model inputs, the calls of quantized layers (``layers.QuantizedModule``, opaque ones
as one node each) and every functional op run by any other module (``x + y``,
``torch.matmul``, ``F.softmax``, ``.view``), each attributed to the innermost module that ran
it and keyed within one call of that module (``matmul_1``: its second matmul). Placement
rules read this graph; at run time the simulation finds the same ops by the same keys.

Like ``torch.jit.trace``, capture follows the path ``dummy_input`` takes: an op on a branch
not taken is not a site. Tensors are told apart by identity; capture holds a reference to
every tensor it sees so no id is reused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .layers import QuantizedModule
from .ops import canonical_name, computes_on_floats, is_inplace, is_pass_through, raw_name

MODEL_OUTPUT = -2  # consumer index meaning "returned by the model"


@dataclass
class TensorInfo:
    """What capture knows of one tensor."""

    node: int  # producing node index; -1 for parameters, buffers and constants
    output: int  # leaf index among the producer's outputs
    is_float: bool
    activation: bool  # derived from a float model input or a layer with weights (not a mask/constant path)
    param: str | None = None  # qualified parameter name, when the tensor is a parameter


@dataclass
class Node:
    """A model input, a quantized-layer call or a functional op."""

    index: int
    kind: str  # "input" | "module" | "function"
    owner: str  # module: its qualified name; function: the module that ran it ("" = root); input: ""
    op: str  # canonical op / class name / input name
    key: str  # function: site key within one call of ``owner`` ("matmul_1"); else ""
    pass_through: bool = False
    inplace: bool = False
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    consumers: list[list[int]] = field(default_factory=list)  # per output leaf: consuming node indices
    module: nn.Module | None = None  # module nodes


@dataclass
class CapturedGraph:
    nodes: list[Node]
    input_names: list[str]  # flattened model input names, in node order of the "input" nodes
    containers: set[str]  # modules that ran functional ops (their code is quantized op by op)
    called: set[str]  # every module called during the forward pass
    params_by_id: dict[int, list[str]]
    outputs: list[tuple[str, TensorInfo]]  # flattened model output tensors: (name, what produced it)
    integer_ops: int = 0  # calls of compute ops on integer tensors only (index arithmetic), not sites

    def function_nodes(self, owner: str) -> list[Node]:
        return [n for n in self.nodes if n.kind == "function" and n.owner == owner]


def positional_names(forward: Callable) -> list[str]:
    """Names of the positional parameters of a bound ``forward``."""
    try:
        return [p.name for p in inspect.signature(forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def named_arguments(positional: list[str], args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """``(name, value)`` for each argument of a call whose positional parameters are ``positional``."""
    named = [(positional[i] if i < len(positional) else f"input_{i}", a) for i, a in enumerate(args)]
    return named + list(kwargs.items())


def input_names(forward: Callable, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """``(name, value)`` for each argument of a call of the bound method ``forward``."""
    return named_arguments(positional_names(forward), args, kwargs)


def flat_input_leaves(named: list[tuple[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """Tensor leaves of the named arguments: ``pixel_values``, or ``inputs.0`` inside containers."""
    out = []
    for name, value in named:
        if isinstance(value, torch.Tensor):
            out.append((name, value))
            continue
        leaves, _ = pytree.tree_flatten_with_path(value)
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                out.append((name + "".join(_path_part(p) for p in path), leaf))
    return out


def _path_part(entry: Any) -> str:
    key = getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))
    return f".{key}"


def output_names(output: Any) -> list[str]:
    """A name per leaf of a model output: ``output`` for a tensor, dict/``ModelOutput`` keys
    (``logits``), ``output_<i>`` for positions in tuples; one entry per leaf of ``tree_leaves``."""
    if isinstance(output, torch.Tensor):
        return ["output"]
    try:
        leaves, _ = pytree.tree_flatten_with_path(output)
    except Exception:  # a pytree node type registered without key paths
        return [f"output_{i}" for i in range(len(pytree.tree_leaves(output)))]
    names = []
    for path, _leaf in leaves:
        parts = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
        name = "_".join(parts)
        names.append(f"output_{name}" if not name or name[0].isdigit() else name)
    return names


class _Recorder:
    def __init__(self, root: nn.Module, leaf_modules: set[str]) -> None:
        self.root = root
        self.names = {m: n for n, m in root.named_modules(remove_duplicate=False)}
        self.leaf_modules = leaf_modules
        self.params_by_id: dict[int, list[str]] = {}
        for name, p in root.named_parameters(remove_duplicate=False):
            self.params_by_id.setdefault(id(p), []).append(name)
        self.nodes: list[Node] = []
        self.tensors: dict[int, TensorInfo] = {}
        self.keep: list[Any] = []  # every tensor seen, so that no id is reused
        self.stack: list[tuple[str, dict[str, int]] | None] = []  # (owner, op counts) or None inside opaque layers
        self.containers: set[str] = set()
        self.input_names: list[str] = []
        self.called: set[str] = set()
        self.outputs: list[tuple[str, TensorInfo]] = []
        self.integer_ops = 0  # ops on integer tensors only (index arithmetic): never sites

    # ------------------------------------------------------------------ tensors
    def info(self, t: torch.Tensor) -> TensorInfo:
        found = self.tensors.get(id(t))
        if found is not None:
            return found
        names = self.params_by_id.get(id(t))
        info = TensorInfo(-1, 0, t.is_floating_point(), False, names[0] if names else None)
        self.tensors[id(t)] = info
        self.keep.append(t)
        return info

    def add_node(self, node: Node, outputs: Any, activation: bool) -> None:
        node.index = len(self.nodes)
        self.nodes.append(node)
        for inp in node.inputs:
            if inp.node >= 0:
                self.nodes[inp.node].consumers[inp.output].append(node.index)
        leaves = pytree.tree_leaves(outputs)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                info = TensorInfo(node.index, i, leaf.is_floating_point(), activation and leaf.is_floating_point())
                self.tensors[id(leaf)] = info
                self.keep.append(leaf)
            else:
                info = TensorInfo(node.index, i, False, False)
            node.outputs.append(info)
            node.consumers.append([])

    # ------------------------------------------------------------------ hooks
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = self.names.get(module, "?")
        self.called.add(name)
        if module is self.root:
            named = flat_input_leaves(input_names(module.forward, args, kwargs))
            for input_name, t in named:
                node = Node(0, "input", "", input_name, "")
                self.add_node(node, t, activation=t.is_floating_point())
                self.input_names.append(input_name)
        opaque = name in self.leaf_modules or (isinstance(module, QuantizedModule) and not module.TRANSPARENT)
        if self.stack and self.stack[-1] is None:
            opaque = True  # inside an opaque layer everything is opaque
        self.stack.append(None if opaque else (name, {}))

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        frame = self.stack.pop()
        name = self.names.get(module, "?")
        outer_opaque = bool(self.stack) and self.stack[-1] is None
        if frame is None and not outer_opaque:  # a quantized layer or a leaf module: one node
            inputs = [self.info(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            has_weights = any(True for _ in module.parameters())
            activation = has_weights or any(i.activation for i in inputs)
            node = Node(0, "module", name, type(module).__name__, "", inputs=inputs, module=module,
                        pass_through=isinstance(module, QuantizedModule) and module.PASS_THROUGH)
            self.add_node(node, output, activation)
        if module is self.root:
            for out_name, leaf in zip(output_names(output), pytree.tree_leaves(output)):
                if isinstance(leaf, torch.Tensor):
                    info = self.info(leaf)
                    self.outputs.append((out_name, info))
                    if info.node >= 0:
                        self.nodes[info.node].consumers[info.output].append(MODEL_OUTPUT)

    # ------------------------------------------------------------------ functions
    def on_function(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        frame = self.stack[-1] if self.stack else None
        if frame is None:
            return
        owner, counts = frame
        op = canonical_name(func)
        if op is not None and not computes_on_floats(args, kwargs):
            op = None  # integer/index arithmetic: never a site, not counted (``ops.computes_on_floats``)
            self.integer_ops += 1
        through = op is None and is_pass_through(func)
        if op is None and not through:
            return
        inputs = [self.info(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        key = ""
        if op is not None:
            k = counts.get(op, 0)
            counts[op] = k + 1
            key = f"{op}_{k}"
        if op is not None or any(i.param is not None for i in inputs):
            self.containers.add(owner)
        node = Node(0, "function", owner, op or raw_name(func), key, pass_through=through, inputs=inputs,
                    inplace=is_inplace(func) or bool(kwargs.get("inplace")))
        self.add_node(node, out, any(i.activation for i in inputs))


class _RecordingMode(TorchFunctionMode):
    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.recorder.on_function(func, args, kwargs, out)
        return out


@torch.no_grad()
def capture(model: nn.Module, args: tuple, kwargs: dict, leaf_modules: tuple[str, ...] = ()) -> CapturedGraph:
    """Run ``model(*args, **kwargs)`` once in eval mode and return what it computed."""
    recorder = _Recorder(model, set(leaf_modules))
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with _RecordingMode(recorder):
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return CapturedGraph(recorder.nodes, recorder.input_names, recorder.containers, recorder.called,
                         recorder.params_by_id, recorder.outputs, recorder.integer_ops)
