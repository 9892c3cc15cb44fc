"""Export: float weights (.pth), the float ONNX graph (.onnx) and the encodings (.encodings).

Every name in the encodings file is a tensor of the ONNX graph: the float graph is exported
with each quantized activation also returned as an extra graph output named after its
quantizer, which pins that name on the tensor whatever the exporter calls things; the extra
outputs are then removed. Param names are the layers' weight initializers (``conv1.weight``).
All three files are written to a temporary directory first and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from torch import fx

from ..fileio import atomic_write_json
from .encodings_io import check_version, encodings_document
from .errors import QuantError
from .modules import to_float

if TYPE_CHECKING:
    from .sim import QuantizationSimModel

ONNX_OPSET = 21  # QuantizeLinear/DequantizeLinear with 16-bit types need opset 21


class ExportError(QuantError, RuntimeError):
    """The export could not produce a graph that honours the naming contract."""


def _graph_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    result = out_node.args[0]
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    if not all(isinstance(o, fx.Node) for o in outputs):
        raise ExportError("export supports models that return a tensor or a tuple/list of tensors")
    return outputs


def _output_names(gm: fx.GraphModule, count: int) -> list[str]:
    """ONNX names of the model outputs: ``output`` or ``output_0..``, avoiding node names."""
    taken = {n.name for n in gm.graph.nodes if n.op != "output"}
    base = "output"
    while base in taken or any(f"{base}_{i}" in taken for i in range(count)):
        base = "graph_" + base
    return [base] if count == 1 else [f"{base}_{i}" for i in range(count)]


def onnx_tensor_names(gm: fx.GraphModule) -> dict[str, str]:
    """Quantizer name -> name of the tensor it quantizes in the exported ONNX graph.

    Model inputs keep their argument names; model outputs are ``output`` (``output_i``);
    every other quantized tensor is named after its quantizer.
    """
    from .sim import ACTIVATION_QUANTIZERS

    prefix = ACTIVATION_QUANTIZERS + "."
    names = {n.target[len(prefix):]: n.target[len(prefix):] for n in gm.graph.nodes
             if n.op == "call_module" and n.target.startswith(prefix)}
    outputs = _graph_outputs(gm)
    for node, out_name in zip(outputs, _output_names(gm, len(outputs))):
        qname = node.target[len(prefix):] if node.op == "call_module" and node.target.startswith(prefix) else None
        if qname is not None and names[qname] == qname:  # a tensor returned twice keeps its first name
            names[qname] = out_name
    return names


def _float_graph(sim: QuantizationSimModel) -> tuple[fx.GraphModule, list[str], list[str], list[str]]:
    """The float graph module returning its outputs plus every quantized activation.

    Returns ``(module, input names, real output names, extra output names)``; the extra
    outputs carry the names ``onnx_tensor_names`` promises.
    """
    from .sim import ACTIVATION_QUANTIZERS, _set_submodule

    tensor_names = onnx_tensor_names(sim.model)
    output_names = _output_names(sim.model, len(_graph_outputs(sim.model)))
    gm = copy.deepcopy(sim.model).cpu().eval()
    for name in sim.weight_layers():
        _set_submodule(gm, name, to_float(gm.get_submodule(name)))
    graph = gm.graph
    extra_nodes, extra_names = [], []
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith(ACTIVATION_QUANTIZERS + "."):
            source, qname = node.args[0], node.target.split(".", 1)[1]
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            if source.op != "placeholder" and tensor_names[qname] == qname:
                extra_nodes.append(source)
                extra_names.append(qname)
    delattr(gm, ACTIVATION_QUANTIZERS)
    input_names = [n.name for n in graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = (tuple(_graph_outputs(gm) + extra_nodes),)
    graph.lint()
    gm.recompile()
    return gm, input_names, output_names, extra_names


def _export_onnx(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], input_names: list[str],
                 output_names: list[str], n_real_outputs: int, path: str) -> onnx.ModelProto:
    # Export with a batch of 2 so the batch dimension can stay symbolic (size 1 specialises).
    inputs = tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)
    inputs = tuple(t.detach().cpu() for t in inputs)
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if t.dim() > 0 else {} for t in inputs)
    # The exporter warns about every torchvision op it cannot find; its optimizer logs each pass.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                gm, inputs, path, input_names=input_names, output_names=output_names, dynamo=True,
                dynamic_shapes=dynamic, opset_version=ONNX_OPSET, external_data=False, verbose=False,
            )
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    model = onnx.load(path)
    graph = model.graph
    for extra in list(graph.output)[n_real_outputs:]:
        graph.output.remove(extra)
    onnx.checker.check_model(model)
    return model


def _check_names(model: onnx.ModelProto, acts: dict, params: dict) -> None:
    graph = model.graph
    tensors = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    missing = [n for n in acts if n not in tensors] + [n for n in params if n not in initializers]
    if missing:
        raise ExportError(
            f"the exported ONNX graph has no tensors named {missing[:5]}; the encodings would not apply"
        )


def export_sim(sim: QuantizationSimModel, path: str, prefix: str, inputs: tuple[torch.Tensor, ...],
               encoding_version: str = "1.0.0") -> dict[str, str]:
    """Write ``{prefix}.pth``, ``{prefix}.onnx`` and ``{prefix}.encodings`` under ``path``."""
    check_version(encoding_version)
    if not prefix or os.sep in prefix or prefix.startswith("."):
        raise ExportError(f"filename_prefix={prefix!r} must be a plain file name such as 'model'")
    if not sim.calibrated:
        raise ExportError("export needs encodings: call sim.compute_encodings(...) first")
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {kind: str(out_dir / f"{prefix}.{kind}") for kind in ("pth", "onnx", "encodings")}
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".{prefix}.export-")
    try:
        staged = {kind: os.path.join(tmp, os.path.basename(p)) for kind, p in final.items()}
        torch.save(sim.float_state_dict(), staged["pth"])

        gm, input_names, output_names, extra_names = _float_graph(sim)
        model = _export_onnx(gm, inputs, input_names, output_names + extra_names, len(output_names),
                             staged["onnx"])
        onnx.save(model, staged["onnx"])

        acts, params = sim.encodings()
        _check_names(model, acts, params)
        doc = encodings_document(acts, params, sim.quantizer_args(), list(sim.config.leaf_modules),
                                 encoding_version)
        atomic_write_json(staged["encodings"], doc)
        for kind, p in final.items():
            os.replace(staged[kind], p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
