"""QuantizationSimModel: a pretrained model with fake-quant nodes, AIMET's workflow.

    sim = QuantizationSimModel(model, dummy_input, config=QuantConfig(...))
    sim.compute_encodings(forward_pass_callback, forward_pass_callback_args)
    ...train and evaluate sim.model like the original...
    sim.export(path, filename_prefix, dummy_input)   # -> .pth, .onnx, .encodings

``sim.model`` is a ``torch.fx.GraphModule`` built from a copy of the model (the caller's model
is not modified): BatchNorms folded (optional), conv/linear layers swapped for their
weight-quantized subclasses, and an ``ActivationQuantizer`` after every model input and
compute op, kept in ``sim.model.activation_quantizers`` under the name of the tensor it
quantizes (also that tensor's name in the exported ONNX graph).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .batchnorm_fold import FoldedPair, fold_batchnorms
from .calibration import make_observer
from .config import QuantConfig
from .encoding import Encoding
from .encodings_io import read_encodings
from .errors import EncodingsFileError, QuantConfigError
from .modules import to_quantized, weight_quantizable
from .placement import QuantizerSite, activation_sites, unquantized_parameters
from .quantizer import ActivationQuantizer, WeightQuantizer
from .tracing import trace

ACTIVATION_QUANTIZERS = "activation_quantizers"
QUANT_SCHEME_NAMES = {  # AIMET's names, for quantizer_args in the encodings file
    ("min_max", False): "post_training_tf",
    ("sqnr", False): "post_training_tf_enhanced",
    ("percentile", False): "post_training_percentile",
    ("min_max", True): "training_range_learning_with_tf_init",
    ("sqnr", True): "training_range_learning_with_tf_enhanced_init",
    ("percentile", True): "training_range_learning_with_percentile_init",
}


def as_input_tuple(dummy_input: Any) -> tuple[torch.Tensor, ...]:
    """``dummy_input`` (a tensor or a tuple/list of tensors) as a tuple of tensors."""
    inputs = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise QuantConfigError(
            f"dummy_input must be a tensor or a tuple of tensors, got {type(dummy_input).__name__}"
        )
    return inputs


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class QuantizationSimModel:
    """Quantization simulation of ``model``; see the module docstring for the workflow.

    Args:
        model: a pretrained float ``nn.Module`` (not modified).
        dummy_input: a tensor or tuple of tensors the model accepts (any batch size); used to
            find which ops produce float tensors, and as the default export input.
        config: a ``QuantConfig``.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, config: QuantConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise QuantConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = config if config is not None else QuantConfig()
        if not isinstance(self.config, QuantConfig):
            raise QuantConfigError(f"config must be a QuantConfig, got {type(self.config).__name__}")
        self.dummy_input = as_input_tuple(dummy_input)
        self.original_class = type(model)
        self.original_state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.batchnorm_eps = {
            name: m.eps for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
        self.model, self.folded, self.sites, self.unquantized = self._build(model)

    # ------------------------------------------------------------------ construction
    def _build(self, model: nn.Module) -> tuple[fx.GraphModule, list[FoldedPair], list[QuantizerSite], list[str]]:
        cfg = self.config
        device = _device_of(model)
        gm = trace(copy.deepcopy(model), cfg.leaf_modules)
        if hasattr(gm, ACTIVATION_QUANTIZERS):
            raise QuantConfigError(f"the model already has an attribute {ACTIVATION_QUANTIZERS!r}")
        folded = fold_batchnorms(gm) if cfg.fold_batchnorm else []
        self._shape_prop(gm)
        sites = activation_sites(gm)
        unquantized = unquantized_parameters(gm, cfg.leaf_modules)
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target not in cfg.leaf_modules:
                module = gm.get_submodule(node.target)
                if weight_quantizable(module):
                    quantizer = WeightQuantizer(
                        cfg.param_bw, module.weight.shape[0], cfg.per_channel,
                        learnable=cfg.learn_weight_encodings, grad_scaling=cfg.lsq_grad_scaling,
                    ).to(device)
                    _set_submodule(gm, node.target, to_quantized(module, quantizer))
        quantizers = nn.ModuleDict()
        gm.add_submodule(ACTIVATION_QUANTIZERS, quantizers)
        last_placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        for site in sites:
            quantizers[site.name] = ActivationQuantizer(
                site.name, cfg.output_bw, learnable=cfg.range_learning, grad_scaling=cfg.lsq_grad_scaling
            ).to(device)
            anchor = last_placeholder if site.node.op == "placeholder" else site.node
            with gm.graph.inserting_after(anchor):
                qnode = gm.graph.call_module(f"{ACTIVATION_QUANTIZERS}.{site.name}", (site.node,))
            site.node.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)
        gm.graph.lint()
        gm.recompile()
        return gm, folded, sites, unquantized

    def _shape_prop(self, gm: fx.GraphModule) -> None:
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*self.dummy_input)
        except Exception as exc:
            raise QuantConfigError(
                f"the model does not run on dummy_input (shapes {[tuple(t.shape) for t in self.dummy_input]}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        finally:
            gm.train(was_training)

    # ------------------------------------------------------------------ quantizers
    def activation_quantizers(self) -> dict[str, ActivationQuantizer]:
        """Activation quantizers by tensor name (the name in the exported ONNX graph)."""
        return dict(getattr(self.model, ACTIVATION_QUANTIZERS).items())

    def weight_layers(self) -> dict[str, nn.Module]:
        """Weight-quantized layers by qualified name (their param name is ``<name>.weight``)."""
        return {
            name: m for name, m in self.model.named_modules()
            if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer)
        }

    def set_quantization_enabled(self, enabled: bool) -> None:
        """Turn every quantizer on or off (off: ``sim.model`` computes in float)."""
        for q in self.activation_quantizers().values():
            q.enabled = enabled
        for layer in self.weight_layers().values():
            layer.weight_quantizer.enabled = enabled

    def quantizer_parameters(self) -> list[nn.Parameter]:
        """Trainable encoding parameters (range learning); keep them out of weight decay."""
        return [p for name, p in self.model.named_parameters() if _is_quantizer_param(name)]

    def model_parameters(self) -> list[nn.Parameter]:
        """The model's own parameters (weights, biases), without quantizer parameters."""
        return [p for name, p in self.model.named_parameters() if not _is_quantizer_param(name)]

    # ------------------------------------------------------------------ calibration
    def compute_encodings(self, forward_pass_callback: Callable[[nn.Module, Any], Any],
                          forward_pass_callback_args: Any = None) -> None:
        """Calibrate: run ``forward_pass_callback(sim.model, args)`` and set every encoding.

        Runs in eval mode under ``torch.no_grad()``; weights are quantized, activation
        quantizers observe their float inputs and pass them through. No weight changes.
        Afterwards the model's train/eval mode is restored.
        """
        cfg = self.config
        quantizers = self.activation_quantizers()
        for layer in self.weight_layers().values():
            layer.weight_quantizer.init_from_weight(layer.weight)
        was_training = self.model.training
        self.model.eval()
        for q in quantizers.values():
            q.start_observing(make_observer(cfg.quant_scheme, cfg.percentile))
        try:
            with torch.no_grad():
                forward_pass_callback(self.model, forward_pass_callback_args)
            for q in quantizers.values():
                q.stop_observing()
        finally:
            for q in quantizers.values():
                q.observer = None
            self.model.train(was_training)

    @property
    def calibrated(self) -> bool:
        """True when every quantizer has an encoding."""
        return all(q.calibrated for q in self.activation_quantizers().values()) and all(
            layer.weight_quantizer.calibrated for layer in self.weight_layers().values()
        )

    # ------------------------------------------------------------------ encodings
    def param_name(self, layer_name: str) -> str:
        return f"{layer_name}.weight"

    def onnx_tensor_names(self) -> dict[str, str]:
        """Activation quantizer name -> the name of its tensor in the exported ONNX graph."""
        from .export import onnx_tensor_names

        return onnx_tensor_names(self.model)

    def encodings(self) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
        """``(activation encodings, param encodings)`` as used now, by ONNX tensor name."""
        names = self.onnx_tensor_names()
        acts = {names[name]: q.encoding() for name, q in self.activation_quantizers().items()}
        params = {
            self.param_name(name): layer.weight_quantizer.encoding(layer.weight)
            for name, layer in self.weight_layers().items()
        }
        return acts, params

    def quantizer_args(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "activation_bitwidth": cfg.output_bw,
            "dtype": "int",
            "is_symmetric": True,
            "param_bitwidth": cfg.param_bw,
            "per_channel_quantization": cfg.per_channel,
            "quant_scheme": QUANT_SCHEME_NAMES[(cfg.quant_scheme, cfg.range_learning)],
        }

    def load_encodings(self, encodings_path: str, *, partial: bool = False) -> None:
        """Set encodings from an AIMET-layout file (1.0.0 or 0.6.1) written for this model.

        Activation encodings are set as given. Param encodings of learned weight quantizers
        are set; weights whose encodings follow the weights are checked against the file
        (a mismatch means the file belongs to other weights). Names the model does not have,
        a wrong bit width, symmetry or channel count raise ``EncodingsFileError``; so do
        quantizers the file does not cover, unless ``partial=True``. Nothing is changed unless
        the whole file matches.
        """
        acts, params = read_encodings(encodings_path)
        names = self.onnx_tensor_names()
        quantizers = {names[n]: q for n, q in self.activation_quantizers().items()}
        layers = {self.param_name(n): layer for n, layer in self.weight_layers().items()}

        def fail(msg: str) -> EncodingsFileError:
            return EncodingsFileError(f"{encodings_path}: {msg}")

        unknown = [n for n in acts if n not in quantizers] + [n for n in params if n not in layers]
        if unknown:
            raise fail(
                f"names {unknown[:5]} are not quantized tensors of this model; "
                f"known: {sorted(quantizers)[:5] + sorted(layers)[:5]}..."
            )
        if not partial:
            missing = [n for n in quantizers if n not in acts] + [n for n in layers if n not in params]
            if missing:
                raise fail(f"no encodings for {missing[:5]} (pass partial=True to load the rest)")
        for name, enc in acts.items():
            q = quantizers[name]
            if enc.bitwidth != q.bitwidth or enc.symmetric or enc.per_channel:
                raise fail(
                    f"{name}: file has bw={enc.bitwidth}, is_sym={enc.symmetric}, {enc.scale.numel()} "
                    f"channel(s); the model's quantizer is bw={q.bitwidth}, asymmetric, per-tensor"
                )
        for name, enc in params.items():
            layer = layers[name]
            wq = layer.weight_quantizer
            channels = layer.weight.shape[0] if wq.per_channel else 1
            if enc.bitwidth != wq.bitwidth or not enc.symmetric or enc.scale.numel() != channels:
                raise fail(
                    f"{name}: file has bw={enc.bitwidth}, is_sym={enc.symmetric}, {enc.scale.numel()} "
                    f"channel(s); the model's quantizer is bw={wq.bitwidth}, symmetric, {channels} channel(s)"
                )
            if not wq.learnable:
                expected = wq.encoding(layer.weight).scale
                if not torch.allclose(enc.scale.float(), expected, rtol=1e-5, atol=0.0):
                    worst = float(((enc.scale - expected).abs() / expected).max())
                    raise fail(
                        f"{name}: weight scales differ from those of the model's weights (max relative "
                        f"difference {worst:.2e}); load the weights exported with this file"
                    )
        for name, enc in acts.items():
            quantizers[name].set_encoding(enc.scale, enc.offset)
        for name, enc in params.items():
            if layers[name].weight_quantizer.learnable:
                layers[name].weight_quantizer.set_scale(enc.scale)

    # ------------------------------------------------------------------ export
    def export(self, path: str, filename_prefix: str, dummy_input: Any = None, *,
               encoding_version: str = "1.0.0") -> dict[str, str]:
        """Write ``{prefix}.pth``, ``{prefix}.onnx``, ``{prefix}.encodings`` under ``path``.

        Returns the three paths by kind (``pth``, ``onnx``, ``encodings``). See ``export.py``.
        """
        from .export import export_sim

        inputs = self.dummy_input if dummy_input is None else as_input_tuple(dummy_input)
        return export_sim(self, path, filename_prefix, inputs, encoding_version)

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The original architecture's ``state_dict`` holding the trained weights, no quantizers.

        Folded BatchNorms become identities that add the folded bias where the layer had none
        (``running_var = 1 - eps``), so ``original.load_state_dict(...)`` in eval mode computes
        what ``sim.model`` computes with quantization disabled.
        """
        from .batchnorm_fold import identity_batchnorm_state

        out = dict(self.original_state_dict)
        current = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                   if not _is_quantizer_param(k)}
        for key, value in current.items():
            if key in out:
                out[key] = value
        for pair in self.folded:
            folded_bias = current[f"{pair.layer}.bias"]
            if not pair.layer_had_bias:
                out.pop(f"{pair.layer}.bias", None)
                beta = folded_bias
            else:
                beta = torch.zeros_like(folded_bias)
            prefix = f"{pair.batchnorm}."
            bn_state = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
            new_state = identity_batchnorm_state(bn_state, self.batchnorm_eps[pair.batchnorm], beta)
            out.update({prefix + k: v for k, v in new_state.items()})
        return out

    # ------------------------------------------------------------------ summary
    def summary(self) -> str:
        """A table of every quantizer: where it sits, bit width, and its current encoding."""
        from .summary import render_summary

        return render_summary(self)

    def __str__(self) -> str:
        return self.summary()


def _is_quantizer_param(name: str) -> bool:
    return name.startswith(ACTIVATION_QUANTIZERS + ".") or ".weight_quantizer." in name or name.startswith(
        "weight_quantizer."
    )


def _set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)
