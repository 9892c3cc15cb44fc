"""Building ``sim.model`` from a float model: swap, capture, place, fold, attach quantizers.

1. a deep copy of the model gets every layer of a registered type swapped for its quantized
   class (``layers/``), except inside ``leaf_modules``;
2. capture (``capture.py``) runs it once on the dummy input; placement (``placement.py``)
   decides every quantizer;
3. BatchNorms are folded; quantizers are created: weights (one per parameter tensor, shared
   by tied parameters), layer outputs, functional ops (owned by the module whose code runs
   them, ``<module>.functional_quantizers``), model inputs (``input_quantizers`` on the root);
4. modules whose code holds functional sites get the frame hooks of ``runtime.py`` and the
   root's class becomes a subclass whose ``forward`` runs the mode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .attention_math import SDPA_PARTS
from .batchnorm_fold import FoldedPair, fold_batchnorms
from .block_formats import BLOCK_FORMATS
from .capture import CapturedGraph, capture, input_names, positional_names
from .config import QuantConfig
from .errors import QuantConfigError
from .formats import format_from_name
from .granularity import PerBlock, PerTensor, PerToken, weight_axes
from .layers import QuantizedModule, quantized_class_for, to_quantized
from .placement import Plan, make_plan
from .quantizer import QuantizeDequantize
from .runtime import (
    QUANTIZER_CONTAINERS,
    OutputSite,
    SdpaSite,
    SimRuntime,
    SiteTable,
    make_root_class,
    pop_frame,
    pop_frame_quantize_output,
    push_frame,
)



@dataclass
class ParamEntry:
    """One quantized weight: its quantizer, its parameter tensor(s) and every name they have.

    Usually one parameter (a tied parameter has several names). A bidirectional RNN layer's
    forward and reverse weights are one entry: quantized stacked (``[2, rows, cols]``, channels
    on axis 1), as the exported ONNX graph holds them in one tensor.
    """

    quantizer: QuantizeDequantize
    names: list[str]
    params: list[nn.Parameter]
    owners: list[str]  # modules that quantize it: its layer, and every module whose code passes it to ops
    adapter: nn.Module | None = None  # its LoRA adapter while it has one (quant/lora.py)

    @property
    def param(self) -> nn.Parameter:
        return self.params[0]

    def values(self) -> torch.Tensor:
        """The tensor the quantizer sees: the parameter (its effective weight under a LoRA
        adapter), or the stacked parameters of a group."""
        if len(self.params) > 1:
            return torch.stack(list(self.params))
        return self.params[0] if self.adapter is None else self.adapter(self.params[0])


@dataclass
class BuiltSim:
    model: nn.Module
    graph: CapturedGraph
    plan: Plan
    folded: list[FoldedPair]
    activations: dict[str, QuantizeDequantize] = field(default_factory=dict)  # name -> quantizer, capture order
    activation_sources: dict[str, str] = field(default_factory=dict)  # name -> "input"/layer class/op
    params: dict[str, ParamEntry] = field(default_factory=dict)  # first name -> entry
    float_params: list[tuple[str, str]] = field(default_factory=list)  # weight-like params left float, why
    output_quantizer_names: dict[str, str] = field(default_factory=dict)  # model output name -> quantizer name
    graph_positional: list[str] = field(default_factory=list)  # names of the root forward's positional parameters


def is_quantizer_key(key: str) -> bool:
    """True for ``state_dict``/parameter names that belong to quantizers."""
    return not QUANTIZER_CONTAINERS.isdisjoint(key.split("."))


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _in_leaf(name: str, leaves: tuple[str, ...]) -> bool:
    return any(name == leaf or name.startswith(leaf + ".") for leaf in leaves)


def _swap_layers(root: nn.Module, leaf_modules: tuple[str, ...]) -> nn.Module:
    """Replace every registered layer (outside leaf modules) by its quantized class, in place."""
    swapped: dict[int, nn.Module] = {}
    for name, module in list(root.named_modules(remove_duplicate=False)):
        if _in_leaf(name, leaf_modules):
            continue
        new = swapped.get(id(module))
        if new is None:
            cls = quantized_class_for(module)
            if cls is None:
                continue
            new = swapped[id(module)] = to_quantized(module, cls)
        if name == "":
            root = new
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
    return root


def _submodule_dict(module: nn.Module, attr: str) -> nn.ModuleDict:
    existing = module._modules.get(attr)
    if existing is None:
        existing = nn.ModuleDict()
        module.add_module(attr, existing)
    return existing


class _Builder:
    def __init__(self, cfg: QuantConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    def activation(self, name: str) -> QuantizeDequantize:
        cfg = self.cfg
        st = cfg.quantizer_settings(name, is_param=False)
        block_format = BLOCK_FORMATS.get(st.format)
        if block_format:  # MX / NVFP4: dynamic blocks along the last dim
            fmt, granularity = block_format.element_format(st.bitwidth), block_format.activation_granularity()
        else:
            fmt = format_from_name(st.format, st.bitwidth, False)
            granularity = PerToken() if st.granularity == "per_token" else PerTensor()
        # A quantizer the config turns off has nothing to learn (no parameter that no loss reaches:
        # DDP refuses those).
        q = QuantizeDequantize(name, st.bitwidth, symmetric=False, learnable=cfg.range_learning and st.enabled,
                               grad_scaling=cfg.lsq_grad_scaling, fmt=fmt, granularity=granularity).to(self.device)
        q.enabled = st.enabled
        return q

    def weight(self, name: str, param: nn.Parameter, axis: int | None) -> QuantizeDequantize:
        """The quantizer of weight ``name``; ``axis``: the layer type's declaration (``WeightAxes``)."""
        cfg = self.cfg
        st = cfg.quantizer_settings(name, is_param=True)
        block_format = BLOCK_FORMATS.get(st.format)
        fmt = block_format.element_format(st.bitwidth) if block_format else format_from_name(st.format, st.bitwidth,
                                                                                              True)
        axes = weight_axes(axis, param.dim()) if param.dim() else None
        granularity = None
        if axes is None or not st.per_channel:
            axis, channels = None, 1
        else:
            axis, channels = axes.channel, param.shape[axes.channel]
            if st.block_size or block_format:
                granularity = block_format.granularity_for(axes.channel, axes.block, st.block_size, st.bitwidth) \
                    if block_format else PerBlock(axes.channel, axes.block, st.block_size)
                try:
                    granularity.scale_shape(tuple(param.shape))
                except ValueError as exc:
                    raise QuantConfigError(f"weight {name!r} of shape {list(param.shape)}: {exc}") from None
        learn = cfg.learn_weight_encodings and st.enabled  # off by config: nothing to learn (as activations)
        q = QuantizeDequantize(name, st.bitwidth, symmetric=True, channels=channels, axis=axis,
                               learnable=learn, follow=not learn,
                               grad_scaling=cfg.lsq_grad_scaling, is_param=True, fmt=fmt, granularity=granularity,
                               shape=tuple(param.shape)).to(param.device)
        q.enabled = st.enabled
        return q


def build(model: nn.Module, args: tuple, kwargs: dict, cfg: QuantConfig) -> BuiltSim:
    """The simulation model of ``model`` (not modified) and what was decided; see the module docstring."""
    known = {name for name, _ in model.named_modules()}
    missing = [n for n in cfg.leaf_modules if n not in known]
    if missing:
        raise QuantConfigError(
            f"leaf_modules names {missing} that are not submodules of {type(model).__name__}; "
            f"allowed: qualified names such as {sorted(n for n in known if n)[:5]}"
        )
    device = _device_of(model)
    root = _swap_layers(copy.deepcopy(model), cfg.leaf_modules)
    graph = capture(root, args, kwargs, cfg.leaf_modules)
    plan = make_plan(graph, cfg.fold_batchnorm, cfg.activation_sites)
    folded = fold_batchnorms(root, plan.folds)
    built = BuiltSim(root, graph, plan, folded)
    b = _Builder(cfg, device)
    _attach_weights(built, b)
    _attach_activations(built, b, args, kwargs)
    return built


def _attach_weights(built: BuiltSim, b: _Builder) -> None:
    root, graph = built.model, built.graph
    by_id: dict[int, ParamEntry] = {}

    def entry_for(params: list[nn.Parameter], axis: int | None, owner: str) -> ParamEntry:
        entry = by_id.get(id(params[0]))
        if entry is None:
            names = [n for p in params for n in graph.params_by_id.get(id(p), [])] or [owner]
            stacked = params[0] if len(params) == 1 else torch.stack(list(params))
            entry = ParamEntry(b.weight(names[0], stacked, axis), names, list(params), [])
            for p in params:
                by_id[id(p)] = entry
            built.params[names[0]] = entry
        entry.owners.append(owner)
        return entry

    for name, module in root.named_modules():
        if not isinstance(module, QuantizedModule) or name not in graph.called:
            continue
        quantizers = _submodule_dict(module, "param_quantizers")
        for pnames, axis in module.quantized_param_groups():
            entry = entry_for([module.get_parameter(p) for p in pnames], axis, name)
            quantizers[pnames[0].replace(".", "__")] = entry.quantizer
    for fqn, axis in built.plan.free_params.items():
        param = root.get_parameter(fqn)
        if param.dim() < 2:
            continue
        owner_name, _, attr = fqn.rpartition(".")
        entry = entry_for([param], axis, owner_name)
        entry.owners.extend(sorted(built.plan.param_users.get(fqn, ())))  # the code that passes it to ops
        owner = root.get_submodule(owner_name)
        if not isinstance(owner, QuantizedModule) or attr.replace(".", "__") not in owner._modules.get(
                "param_quantizers", {}):
            _submodule_dict(owner, "param_quantizers")[attr] = entry.quantizer
    quantized = {id(p) for e in built.params.values() for p in e.params}
    seen: set[int] = set()
    for name, param in root.named_parameters(remove_duplicate=False):
        if id(param) in quantized or id(param) in seen or param.dim() < 2 or is_quantizer_key(name):
            continue
        seen.add(id(param))
        owner = name.rpartition(".")[0]
        if any(_in_leaf(owner, (leaf,)) for leaf in b.cfg.leaf_modules):
            why = "inside a leaf module (run as written)"
        elif owner not in graph.called:
            why = "its module is never called in the forward pass"
        else:
            why = "not passed to any op the simulation sees"
        built.float_params.append((name, why))


def _attach_activations(built: BuiltSim, b: _Builder, args: tuple, kwargs: dict) -> None:
    root, graph, plan = built.model, built.graph, built.plan
    built.graph_positional = positional_names(root.forward)
    runtime = SimRuntime(type(root).forward, built.graph_positional, {})
    names: dict[int, str] = {}  # (node index, leaf) packed -> quantizer name, for model output naming

    # model inputs
    if plan.inputs:
        holder = _submodule_dict(root, "input_quantizers")
        for arg_name, value in input_names(root.forward, args, kwargs):
            leaves = [(arg_name, 0)] if isinstance(value, torch.Tensor) else [
                (arg_name + "".join(f".{getattr(p, 'key', getattr(p, 'idx', p))}" for p in path), i)
                for i, (path, _) in enumerate(pytree.tree_flatten_with_path(value)[0])]
            for leaf_name, index in leaves:
                if leaf_name in plan.inputs:
                    q = b.activation(leaf_name)
                    holder[leaf_name.replace(".", "__")] = q
                    runtime.inputs.setdefault(arg_name, {})[index] = q
                    built.activations[leaf_name] = q
                    built.activation_sources[leaf_name] = "model input"

    # layer outputs, functional ops, in capture order
    for node in graph.nodes:
        if node.kind == "module" and node.owner in plan.module_outputs:
            module = root.get_submodule(node.owner)
            if "output_quantizers" in module._modules:
                continue  # a layer called twice shares its quantizers
            leaves = plan.module_outputs[node.owner]
            holder = _submodule_dict(module, "output_quantizers")
            for i in leaves:
                name = node.owner if len(node.outputs) == 1 else f"{node.owner}.output_{i}"
                holder[str(i)] = q = b.activation(name)
                built.activations[name] = q
                built.activation_sources[name] = f"output of {node.op}"
                names[node.index * 1000 + i] = name
        elif node.kind == "function" and node.key in plan.functions.get(node.owner, {}):
            module = root.get_submodule(node.owner)
            holder = _submodule_dict(module, "functional_quantizers")
            if node.key in holder:
                continue
            site = plan.functions[node.owner][node.key]
            prefix = f"{node.owner}.{node.key}" if node.owner else node.key
            if site.sdpa:
                parts = nn.ModuleDict({p: b.activation(f"{prefix}.{p}") for p in SDPA_PARTS})
                holder[node.key] = parts
                for p, q in parts.items():
                    built.activations[q.name] = q
                    built.activation_sources[q.name] = f"{p} of scaled_dot_product_attention"
                names[node.index * 1000] = parts["output"].name
            elif site.outputs == [0] and len(node.outputs) == 1:
                name = f"{prefix}.output" if node.op == "sdpa" else prefix  # the attention's output: one name
                holder[node.key] = q = b.activation(name)
                built.activations[name] = q
                built.activation_sources[name] = f"output of {node.op}"
                names[node.index * 1000] = name
            else:
                parts = nn.ModuleDict({str(i): b.activation(f"{prefix}.output_{i}") for i in site.outputs})
                holder[node.key] = parts
                for i, q in parts.items():
                    built.activations[q.name] = q
                    built.activation_sources[q.name] = f"output {i} of {node.op}"
                    names[node.index * 1000 + int(i)] = q.name
    for out_name, info in graph.outputs:
        qname = names.get(info.node * 1000 + info.output) if info.node >= 0 else None
        if qname is not None:
            built.output_quantizer_names.setdefault(out_name, qname)
    _install_runtime(built, runtime)


def _site_table(module: nn.Module, owner: str, built: BuiltSim) -> SiteTable | None:
    sites: dict[tuple[str, int], Any] = {}
    holder = module._modules.get("functional_quantizers")
    for key, site in built.plan.functions.get(owner, {}).items():
        op, _, k = key.rpartition("_")
        quantizers = holder[key]
        if site.sdpa:
            sites[(op, int(k))] = SdpaSite(quantizers)
        elif isinstance(quantizers, QuantizeDequantize):
            sites[(op, int(k))] = OutputSite({0: quantizers})
        else:
            sites[(op, int(k))] = OutputSite({int(i): q for i, q in quantizers.items()})
    params = {e.names[0]: e.quantizer for e in built.params.values() if owner in e.owners and len(e.params) == 1}
    if not sites and not params:
        return None
    return SiteTable(sites, params)


def _install_runtime(built: BuiltSim, runtime: SimRuntime) -> None:
    root, graph = built.model, built.graph
    leaf_modules = {n.owner for n in graph.nodes if n.kind == "module" and not isinstance(n.module, QuantizedModule)}
    for name in sorted(graph.containers | leaf_modules):
        module = root.get_submodule(name)
        module._qsim_runtime = runtime
        module._qsim_sites = None if name in leaf_modules else _site_table(module, name, built)
        if name == "":
            continue  # the root's frame is pushed by its forward (root_forward)
        module.register_forward_pre_hook(push_frame, with_kwargs=True)
        if name in leaf_modules and "output_quantizers" in module._modules:
            module.register_forward_hook(pop_frame_quantize_output, with_kwargs=True)
        else:
            module.register_forward_hook(pop_frame, with_kwargs=True)
    root._qsim_runtime = runtime
    runtime.root = root
    if "" not in graph.containers:
        root._qsim_sites = None
    root.__class__ = make_root_class(type(root))
