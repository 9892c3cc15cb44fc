"""Export: float weights (.pth), the float ONNX graph (.onnx) and the encodings (.encodings).

Every name in the encodings file is a tensor of the ONNX graph:

- activations: the float graph is exported (quantizers off, attention as explicit ops) with
  every quantized activation also returned as an extra graph output; afterwards each such
  tensor is renamed to its quantizer's name (an exporter value that already has that name is
  renamed first, so names never collide), model inputs and outputs keep their graph names
  (``input_ids``, ``logits``), and the extra outputs are removed;
- parameters: each quantized parameter is found among the initializers by value
  (``onnx_params.py``: through transposes, constant folding, gate reordering and merges); a
  copy holding it as is is named after it, a transposed or reordered copy ``<name>.T`` /
  ``<name>.reordered``, and its encoding names the channel axis (and order) of that tensor.

All three files are written to a temporary directory first and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from onnx import helper
import torch
from torch.utils import _pytree as pytree

from ..fileio import atomic_write_json
from .capture import flat_input_leaves, named_arguments
from .encoding import Encoding
from .encodings_io import check_version, default_version, encodings_document
from .errors import QuantError, QuantFileError
from .lora import merge_lora
from .onnx_params import ParamLocator
from .runtime import root_forward

if TYPE_CHECKING:
    from .sim import QuantizationSimModel

ONNX_OPSET = 21  # QuantizeLinear/DequantizeLinear with 16-bit types need opset 21
EXTRA = "qsim_activation_"


class ExportError(QuantError, RuntimeError):
    """The export could not produce a graph that honours the naming contract."""


# ---------------------------------------------------------------------------- inputs
def _flat_inputs(sim: QuantizationSimModel, dummy_input: Any):
    """Flattened input tensors, their names, and a function rebuilding ``(args, kwargs)`` from them."""
    from .sim import as_call

    args, kwargs = as_call(dummy_input)
    named = named_arguments(sim._built.graph_positional, args, kwargs)
    leaves = flat_input_leaves(named)
    names = [name for name, _ in leaves]
    structure = pytree.tree_flatten((args, kwargs))

    def rebuild(flat: tuple) -> tuple[tuple, dict]:
        values, spec = structure
        it = iter(flat)
        values = [next(it) if isinstance(v, torch.Tensor) else v for v in values]
        return pytree.tree_unflatten(values, spec)

    tensors = []
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu()
            if t.dim() > 0 and t.shape[0] == 1:  # batch 1 would specialise the batch dimension
                t = torch.cat([t, t])
            tensors.append(t)
    return tuple(tensors), names, rebuild


# ---------------------------------------------------------------------------- the float graph
@contextlib.contextmanager
def _export_mode(sim: QuantizationSimModel, rebuild, collected: list):
    """``sim.model`` temporarily as the float graph that returns (outputs..., quantized activations...)."""
    model = sim.model
    inputs = set(sim._built.plan.inputs)
    quantizers = sim._all_quantizers()
    enabled = [q.enabled for q in quantizers]
    # A copy, not the tensor itself: code may change the tensor in place afterwards (``out += identity``).
    hooks = [q.register_forward_hook(lambda mod, a, out: collected.append((mod.name, out.clone())))
             for name, q in sim.activation_quantizers().items() if q.enabled and name not in inputs]
    cls, was_training = type(model), model.training

    def export_forward(self, *flat):
        collected.clear()
        args, kwargs = rebuild(flat)
        out = root_forward(self, *args, **kwargs)
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return (*outputs, *[t for _, t in collected])

    model.__class__ = type(cls.__name__, (cls,), {"forward": export_forward})
    for q in quantizers:
        q.enabled = False
    model.eval()
    try:
        yield model
    finally:
        model.__class__ = cls
        model.train(was_training)
        for q, on in zip(quantizers, enabled):
            q.enabled = on
        for h in hooks:
            h.remove()


def _torch_onnx_export(model, inputs, input_names, output_names, path: str) -> None:
    auto = torch.export.Dim.AUTO
    dynamic = tuple({d: auto for d in range(t.dim())} for t in inputs)  # forward(*flat): one entry, a tuple
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, path, input_names=input_names, output_names=output_names, dynamo=True,
                              dynamic_shapes=(dynamic,), opset_version=ONNX_OPSET, external_data=False, verbose=False)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------- renaming
def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value (or initializer) ``old`` to ``new`` everywhere in ``graph``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for group in (graph.input, graph.output, graph.value_info):
        for v in group:
            if v.name == old:
                v.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o.name for o in graph.output}
    return names | {o for n in graph.node for o in n.output}


def _claim(graph: onnx.GraphProto, name: str, taken: set[str]) -> None:
    """Make ``name`` free: an exporter value already called so is renamed to a fresh name."""
    if name not in taken:
        return
    fresh, k = f"{name}__onnx", 1
    while fresh in taken:
        fresh, k = f"{name}__onnx{k}", k + 1
    _rename(graph, name, fresh)
    taken.add(fresh)
    taken.discard(name)


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is used (the Identity copies of removed outputs)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _name_activations(model: onnx.ModelProto, n_real: int, collected: list[str],
                      quantized_inputs: set[str]) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Rename each collected activation to its quantizer's name. Returns quantizer -> ONNX tensor
    names, and ``(quantizer, note)`` for each quantizer whose tensor the exporter had merged with
    an earlier quantizer's (see ``_split``)."""
    graph = model.graph
    outputs = [o.name for o in graph.output]
    graph_inputs = {i.name for i in graph.input}
    kept = graph_inputs | set(outputs[:n_real])
    taken = _all_names(graph)
    claimed: dict[str, str] = {n: n for n in quantized_inputs}  # ONNX tensor -> quantizer whose encoding it carries
    result: dict[str, list[str]] = {}
    notes: list[tuple[str, str]] = []
    for i, qname in enumerate(collected):
        producers = {o: n for n in graph.node for o in n.output}
        src = list(graph.output)[n_real + i].name
        while src in producers and producers[src].op_type == "Identity" and src not in kept:
            src = producers[src].input[0]
        calls = result.setdefault(qname, [])
        target = qname if not calls else f"{qname}.call_{len(calls)}"
        if src in claimed:  # an op between two quantizers was folded away (cat with an empty cache, ...)
            earlier = claimed[src]
            src = _split(graph, src, target, taken, kept, claimed, result)
            notes.append((qname, f"the exporter merged its tensor with {earlier}'s (the op between them "
                                 "does not survive export); its encoding is on an Identity copy after it"))
        elif src in kept:  # a graph input or a model output: keep the graph's name
            pass
        elif src != target:
            _claim(graph, target, taken)
            _rename(graph, src, target)
            taken.add(target)
            src = target
        claimed[src] = qname
        calls.append(src)
    for extra in list(graph.output)[n_real:]:
        graph.output.remove(extra)
    _prune(graph)
    alive = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    for qname in list(result):
        if not all(n in alive for n in result[qname]):
            result[qname] = [n for n in result[qname] if n in alive]
            notes.append((qname, "its result reaches no model output (a branch the outputs do not use), so the "
                                 "exported graph does not compute it and no encoding names it"))
            if not result[qname]:
                del result[qname]
    return result, notes


def _split(graph: onnx.GraphProto, src: str, target: str, taken: set[str], kept: set[str],
           claimed: dict[str, str], result: dict[str, list[str]]) -> str:
    """Give a later quantizer a tensor of its own where the exporter merged its tensor ``src`` with
    an earlier quantizer's: ``Identity(src) -> new``, every consumer of ``src`` reading ``new``
    (the sim's later ops see the later quantizer's output). A model output keeps its graph name
    on the later tensor; the earlier quantizer's tensor is renamed. Returns the new tensor's name."""
    outputs = {o.name for o in graph.output}
    if src in outputs and src not in {i.name for i in graph.input}:
        earlier = claimed.pop(src)
        fresh = earlier if earlier not in taken else f"{earlier}__pre"
        _claim(graph, fresh, taken)
        for node in graph.node:  # the producer writes ``fresh``; consumers keep reading ``src``
            node.output[:] = [fresh if o == src else o for o in node.output]
        taken.add(fresh)
        claimed[fresh] = earlier
        result[earlier] = [fresh if n == src else n for n in result[earlier]]
        _insert_after(graph, fresh, helper.make_node("Identity", [fresh], [src], name=f"{src}__split"))
        return src
    _claim(graph, target, taken)
    taken.add(target)
    for node in graph.node:
        node.input[:] = [target if i == src else i for i in node.input]
    _insert_after(graph, src, helper.make_node("Identity", [src], [target], name=f"{target}__split"))
    return target


def _insert_after(graph: onnx.GraphProto, tensor: str, node: onnx.NodeProto) -> None:
    """Insert ``node`` right after the producer of ``tensor`` (first, for a graph input): the
    graph stays topologically sorted."""
    at = next((k + 1 for k, n in enumerate(graph.node) if tensor in n.output), 0)
    graph.node.insert(at, node)


# ---------------------------------------------------------------------------- params
def _param_encodings(sim: QuantizationSimModel, model: onnx.ModelProto) -> tuple[dict[str, Encoding], dict[str, dict]]:
    """``({initializer name: encoding}, {initializer name: {"source", "channel_order"}})`` for every
    quantized parameter; derived copies are named ``<param>.T`` / ``<param>.reordered``."""
    graph = model.graph
    locator = ParamLocator(model)
    taken = _all_names(graph)
    encodings: dict[str, Encoding] = {}
    sources: dict[str, dict] = {}
    model_tensors = set(sim.original_state_dict)  # names the exporter gives initializers it keeps as they are
    for name, entry in sim.quantized_params().items():
        q = entry.quantizer
        if not q.enabled:
            continue
        values = entry.values().detach()
        enc = q.encoding(values)
        array = values.cpu().float().numpy()
        others = model_tensors - set(entry.names)
        # An initializer named after another tensor of the model is that tensor; it holds this
        # parameter only where the exporter merged equal tensors (then it has the same shape).
        found = [loc for loc in locator.locate(array, q.axis)
                 if loc.initializer not in others or _dims(graph, loc.initializer) == list(array.shape)]
        if not found and q.axis is None:
            found = locator.locate_gathered(array, others)
            if found:
                sim.export_notes.append((name, "read through a constant index, which the exporter folds into a new "
                                               f"tensor: its per-tensor encoding is on {name}.gathered"))
        if not found:
            raise ExportError(
                f"parameter {name!r}: no initializer of the exported ONNX graph holds its values (the exporter "
                "transformed it beyond transposes, reordering and constant indexing), so its encoding could not "
                f"name a tensor; keep it float with overrides={{{name!r}: {{'enabled': False}}}}"
            )
        for loc in found:
            current = loc.initializer
            if loc.kind == "identity":
                wanted = current if current in entry.names or current in others else name
            else:
                suffix = {"transposed": "T", "reordered": "reordered", "gathered": "gathered"}[loc.kind]
                wanted = f"{name}.{suffix}"
            # An initializer already named for a parameter (an earlier one of a merged pair) keeps its name.
            if wanted != current and wanted not in taken and current not in encodings:
                _rename(graph, current, wanted)
                taken.add(wanted)
                current = wanted
            mapped = _map_encoding(name, enc, loc, values.dim(), graph, current)
            previous = encodings.get(current)
            same = previous is None or (torch.equal(previous.scale, mapped.scale) and previous.axis == mapped.axis)
            if not same:
                other = sources.get(current, {}).get("source", current)
                raise ExportError(
                    f"parameters {other!r} and {name!r} hold equal values, which the exporter merged into one "
                    f"tensor {current!r}, but their encodings differ"
                )
            encodings[current] = mapped
            if current not in entry.names:
                sources[current] = {"source": name}
            if loc.order is not None:
                sources[current]["channel_order"] = list(loc.order)
    return encodings, sources


def _dims(graph: onnx.GraphProto, initializer: str) -> list[int]:
    return next(list(i.dims) for i in graph.initializer if i.name == initializer)


def _map_encoding(name: str, enc: Encoding, loc, rank: int, graph: onnx.GraphProto, current: str) -> Encoding:
    """``enc`` (in the parameter's layout) for the initializer ``loc`` found: channel order, axes,
    and for per-block encodings the scale tensor transposed or reordered with it."""
    scale, offset = enc.scale, enc.offset
    if not enc.per_block:
        if loc.order is not None and enc.axis is not None:
            scale, offset = scale[list(loc.order)], offset[list(loc.order)]
        return dataclasses.replace(enc, scale=scale, offset=offset, axis=loc.axis)
    init_rank = next(len(i.dims) for i in graph.initializer if i.name == current)
    if init_rank != rank:
        raise ExportError(f"parameter {name!r}: its per-block encoding cannot follow the exporter's reshape to "
                          f"{init_rank} dims ({current!r}); quantize it per channel (overrides block_size: 0)")
    block_axis = enc.block_axis
    parts = {"scale": scale, "offset": offset, "inner": enc.inner, "outer": enc.outer}
    parts = {k: v for k, v in parts.items() if v is not None and v.dim() == rank}  # NVFP4's outer: one element
    if loc.kind == "transposed":
        parts, block_axis = {k: v.T for k, v in parts.items()}, 1 - block_axis
    elif loc.order is not None:
        index = torch.tensor(loc.order)
        parts = {k: v.index_select(enc.axis, index) if v.shape[enc.axis] > 1 else v for k, v in parts.items()}
    return dataclasses.replace(enc, **{k: v.contiguous() for k, v in parts.items()}, axis=loc.axis,
                               block_axis=block_axis)


def _check_names(model: onnx.ModelProto, acts: dict, params: dict) -> None:
    graph = model.graph
    tensors = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    missing = [n for n in acts if n not in tensors | initializers] + [n for n in params if n not in initializers]
    if missing:
        raise ExportError(
            f"the exported ONNX graph has no tensors named {missing[:5]}; the encodings would not apply"
        )


# ---------------------------------------------------------------------------- entry point
def _staging_prefix(prefix: str) -> str:
    return f".{prefix}.export-"


def remove_stale_staging(out_dir: Path, prefix: str) -> None:
    """Remove staging directories (``.{prefix}.export-<pid>@<host>-*``) that a process of this host
    left when it was killed mid-export: the writer is no longer running. Another host's are kept."""
    host = socket.gethostname()
    for d in out_dir.glob(f"{_staging_prefix(prefix)}*"):
        owner = d.name[len(_staging_prefix(prefix)):].rsplit("-", 1)[0]
        pid, _, owner_host = owner.partition("@")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def export_sim(sim: QuantizationSimModel, path: str, prefix: str, dummy_input: Any,
               encoding_version: str | None = None) -> dict[str, str]:
    """Write ``{prefix}.pth``, ``{prefix}.onnx`` and ``{prefix}.encodings`` under ``path``
    (``encoding_version`` None: 1.0.0, or 2.1.0 where an encoding needs it: ``encodings_io``).
    LoRA adapters are merged into their weights first (``lora.merge_lora``: ``sim`` keeps them merged)."""
    if encoding_version is not None:
        check_version(encoding_version)
    if not isinstance(prefix, str) or not prefix or os.sep in prefix or prefix.startswith("."):
        raise ExportError(f"filename_prefix={prefix!r} must be a plain file name such as 'model'")
    if not sim.calibrated:
        raise ExportError("export needs encodings: call sim.compute_encodings(...) first")
    merge_lora(sim)  # LoRA adapters into their weights, in place: the export holds none (quant/lora.py)
    out_dir = Path(path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir, prefix)
        tmp = tempfile.mkdtemp(dir=out_dir, prefix=f"{_staging_prefix(prefix)}{os.getpid()}@{socket.gethostname()}-")
    except OSError as exc:
        raise QuantFileError(f"cannot write the export to {out_dir}: {exc.strerror or exc}") from None
    final = {kind: str(out_dir / f"{prefix}.{kind}") for kind in ("pth", "onnx", "encodings")}
    try:
        staged = {kind: os.path.join(tmp, os.path.basename(p)) for kind, p in final.items()}
        torch.save(sim.float_state_dict(), staged["pth"])
        model, act_names = _export_graph(sim, dummy_input, staged["onnx"])
        params, sources = _param_encodings(sim, model)
        current, _ = sim.encodings()
        acts = {}
        for qname, names in act_names.items():
            for onnx_name in names:
                acts[onnx_name] = current[qname]
        acts.update({n: current[n] for n in sim._built.plan.inputs if n in current})  # model inputs
        _check_names(model, acts, params)
        onnx.checker.check_model(model)
        onnx.save(model, staged["onnx"])
        shapes = {i.name: list(i.dims) for i in model.graph.initializer if i.name in params}
        doc = encodings_document(acts, params, sim.quantizer_args(), list(sim.config.leaf_modules),
                                 encoding_version or default_version([*acts.values(), *params.values()]), sources,
                                 shapes)
        atomic_write_json(staged["encodings"], doc)
        for kind, p in final.items():
            os.replace(staged[kind], p)
    except OSError as exc:
        raise QuantFileError(f"cannot write the export to {out_dir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _export_graph(sim: QuantizationSimModel, dummy_input: Any,
                  path: str) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    inputs, input_names, rebuild = _flat_inputs(sim, dummy_input)
    output_names = [name for name, _ in sim._built.graph.outputs]
    collected: list = []
    with _export_mode(sim, rebuild, collected) as model:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(*[t.to(device) for t in inputs])
        names = [n for n, _ in collected]
        model.cpu()
        try:
            _torch_onnx_export(model, inputs, input_names, output_names + [f"{EXTRA}{i}" for i in range(len(names))],
                               path)
        finally:
            model.to(device)
    onnx_model = onnx.load(path)
    names_by_quantizer, notes = _name_activations(onnx_model, len(output_names), names, set(sim._built.plan.inputs))
    sim.export_notes = notes
    return onnx_model, names_by_quantizer
