"""Where quantizers go in a traced graph.

Rules (DESIGN.md, "Default placement"):
- every floating-point model input gets an activation quantizer;
- every compute op's floating-point output gets one: modules, functions (``x + y``,
  ``torch.cat``, ``F.relu``) and tensor methods alike;
- data-movement ops whose outputs are a subset of their inputs' values (reshapes, slicing,
  dropout, max pooling) get none: their input is already on a grid;
- no quantizer inside a supergroup: a conv/linear, BatchNorm or add whose only user is a
  ReLU/ReLU6/Hardtanh (clip), or a conv/linear whose only user is an unfolded BatchNorm,
  leaves its output to the last op of the group;
- conv/linear weights are quantized (see ``modules.py``); biases are not.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .batchnorm_fold import BATCHNORMS
from .modules import weight_quantizable

PASS_THROUGH_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
PASS_THROUGH_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
    torch.t, torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select, getattr,
    F.dropout, F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
PASS_THROUGH_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "permute", "transpose", "t", "contiguous", "chunk", "split", "unbind", "narrow", "select",
    "expand", "expand_as", "repeat", "size", "dim", "detach", "clone",
}
FUSED_ACTIVATION_MODULES = (nn.ReLU, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh
FUSED_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh}
FUSED_ACTIVATION_METHODS = {"relu", "relu_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class QuantizerSite:
    """An activation tensor that gets a quantizer; ``name`` is also its ONNX tensor name."""

    name: str
    node: fx.Node
    op: str  # what produces the tensor, for summaries: "model input", "Conv2d conv1", "add", ...


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "placeholder":
        return "model input"
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} {node.target}"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def _is_pass_through(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), PASS_THROUGH_MODULES)
    if node.op == "call_method":
        return node.target in PASS_THROUGH_METHODS
    if node.op == "call_function":
        if node.target is operator.getitem:
            source = node.args[0]
            # Indexing a tensor moves data; picking an output of a tuple-returning op does not,
            # unless that op itself only moved data (torch.split, .chunk).
            return not isinstance(source, fx.Node) or _is_float_tensor(source) or _is_pass_through(source, gm)
        return node.target in PASS_THROUGH_FUNCTIONS
    return False


def _is_fused_activation(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), FUSED_ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in FUSED_ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in FUSED_ACTIVATION_METHODS
    return False


def _in_supergroup(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` is a non-final member of a supergroup (its output stays float)."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        is_layer = weight_quantizable(module)
        if is_layer and user.op == "call_module" and isinstance(gm.get_submodule(user.target), BATCHNORMS):
            return True
        return (is_layer or isinstance(module, BATCHNORMS)) and _is_fused_activation(user, gm)
    is_add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )
    return is_add and _is_fused_activation(user, gm)


def activation_sites(gm: fx.GraphModule) -> list[QuantizerSite]:
    """The activation tensors to quantize, in graph order (needs ShapeProp metadata)."""
    sites = []
    for node in gm.graph.nodes:
        if node.op in ("output", "get_attr") or not _is_float_tensor(node):
            continue
        if node.op == "placeholder":
            if node.users:
                sites.append(QuantizerSite(node.name, node, describe(node, gm)))
            continue
        if _is_pass_through(node, gm) or _in_supergroup(node, gm):
            continue
        sites.append(QuantizerSite(node.name, node, describe(node, gm)))
    return sites


def unquantized_parameters(gm: fx.GraphModule, leaf_modules: tuple[str, ...]) -> list[str]:
    """Descriptions of weights (tensors of 2+ dims) that stay float, for ``sim.summary()``."""
    notes = [f"{name} (leaf module: its internals and weights stay float)" for name in leaf_modules]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in leaf_modules:
            module = gm.get_submodule(node.target)
            if weight_quantizable(module):
                continue
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() >= 2:
                    notes.append(f"{node.target}.{pname} ({type(module).__name__} weights are not quantized)")
        elif node.op == "get_attr":
            value = getattr(gm, node.target, None) if "." not in node.target else None
            if value is None:
                owner, _, attr = node.target.rpartition(".")
                value = getattr(gm.get_submodule(owner), attr, None)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                notes.append(f"{node.target} (used by a functional op; not quantized)")
    return notes
