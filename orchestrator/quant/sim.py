"""QuantizationSimModel: a pretrained model with fake-quant nodes, AIMET's workflow.

    sim = QuantizationSimModel(model, dummy_input, config=QuantConfig(...))
    sim.compute_encodings(forward_pass_callback, forward_pass_callback_args)
    ...train and evaluate sim.model like the original...
    sim.export(path, filename_prefix, dummy_input)   # -> .pth, .onnx, .encodings

``sim.model`` is a copy of the model (the caller's model is not modified) with the same
classes, call convention and return structure (``sim.model(**batch).logits`` works for a
Hugging Face model): layers of registered types swapped for their quantized classes,
BatchNorms folded, and functional ops quantized where its code calls them (``build.py``,
``runtime.py``). Every quantizer has a name (``sim.summary()``): parameters by their
qualified name, activations by the module and op that compute them (``encoder.layer.0.
attention.self.sdpa_0.probs``); the exported encodings name the tensors of the ONNX graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .build import ParamEntry, build, is_quantizer_key
from .config import QuantConfig
from .encoding import Encoding
from .errors import CalibrationError, QuantConfigError, QuantError
from .observers import make_observer
from .outliers import LOW_SQNR_DB, OUTLIER_MIN_BITS, OutlierWarning, SampledObserver, tensor_sqnr, warning_text
from .quantizer import QuantizeDequantize

QUANT_SCHEME_NAMES = {  # AIMET's names, for quantizer_args in the encodings file
    ("min_max", False): "post_training_tf",
    ("sqnr", False): "post_training_tf_enhanced",
    ("percentile", False): "post_training_percentile",
    ("min_max", True): "training_range_learning_with_tf_init",
    ("sqnr", True): "training_range_learning_with_tf_enhanced_init",
    ("percentile", True): "training_range_learning_with_percentile_init",
}


class EncodingCollapseWarning(UserWarning):
    """A learned scale reached its floor: the quantizer's range shrank to almost nothing."""


def as_call(dummy_input: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a model call: a tensor, a tuple/list of arguments, or a dict of keyword arguments."""
    if isinstance(dummy_input, torch.Tensor):
        return (dummy_input,), {}
    if isinstance(dummy_input, (tuple, list)) and dummy_input:
        return tuple(dummy_input), {}
    if isinstance(dummy_input, dict) and dummy_input and all(isinstance(k, str) for k in dummy_input):
        return (), dict(dummy_input)
    raise QuantConfigError(
        f"dummy_input must be a tensor, a non-empty tuple of arguments or a dict of keyword arguments, "
        f"got {type(dummy_input).__name__}"
    )


def _describe(dummy_input: Any) -> str:
    args, kwargs = as_call(dummy_input)
    shape = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
    return ", ".join([str(shape(a)) for a in args] + [f"{k}={shape(v)}" for k, v in kwargs.items()])


class QuantizationSimModel:
    """Quantization simulation of ``model``; see the module docstring for the workflow.

    Args:
        model: a pretrained float ``nn.Module`` (not modified).
        dummy_input: what the model is called with: a tensor, a tuple of positional arguments,
            or a dict of keyword arguments (``{"input_ids": ..., "attention_mask": ...}``), any
            batch size. The simulation runs it once to find what to quantize; it is also the
            default export input.
        config: a ``QuantConfig``.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, config: QuantConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise QuantConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = config if config is not None else QuantConfig()
        if not isinstance(self.config, QuantConfig):
            raise QuantConfigError(f"config must be a QuantConfig, got {type(self.config).__name__}")
        args, kwargs = as_call(dummy_input)
        self.dummy_input = dummy_input
        self.original_class = type(model)
        self.original_state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.batchnorm_eps = {
            name: m.eps for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
        try:
            built = build(model, args, kwargs, self.config)
        except QuantError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise QuantConfigError(
                f"the model does not run on dummy_input ({_describe(dummy_input)}): {type(exc).__name__}: {first}"
            ) from exc
        self._built = built
        self.model: nn.Module = built.model
        self.folded = built.folded
        self._watched: set[str] = set()
        # Set by ``compute_encodings``: per-tensor SQNR (dB) of each activation on its calibrated
        # grid, and those below 20 dB (``outliers.py``).
        self.tensor_sqnr: dict[str, float] = {}
        self.low_sqnr_tensors: dict[str, float] = {}
        # Set by the last ``export``: (quantizer, how its encoding reached the ONNX graph) where not
        # on the tensor of its own op (``summary()`` prints them).
        self.export_notes: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ quantizers
    def activation_quantizers(self) -> dict[str, QuantizeDequantize]:
        """Activation quantizers by name (model inputs, layer outputs, functional ops), in graph order."""
        return dict(self._built.activations)

    def param_quantizers(self) -> dict[str, QuantizeDequantize]:
        """Weight quantizers by parameter name (the first name of a tied parameter)."""
        return {name: e.quantizer for name, e in self._built.params.items()}

    def quantized_params(self) -> dict[str, ParamEntry]:
        """Weight quantizers with their parameter tensors and every name the tensor has."""
        return dict(self._built.params)

    def set_quantization_enabled(self, enabled: bool) -> None:
        """Turn every quantizer on or off (off: ``sim.model`` computes in float); on means on as the
        config says (``quantize_activations``, ``overrides``' ``enabled``)."""
        for name, q in self._built.activations.items():
            q.enabled = enabled and self.config.quantizer_settings(name, is_param=False).enabled
        for name, e in self._built.params.items():
            e.quantizer.enabled = enabled and self.config.quantizer_settings(name, is_param=True).enabled

    def _all_quantizers(self) -> list[QuantizeDequantize]:
        return list(self._built.activations.values()) + [e.quantizer for e in self._built.params.values()]

    def quantizer_parameters(self) -> list[nn.Parameter]:
        """Trainable encoding parameters (range learning): give them their own optimizer group,
        without weight decay."""
        return [p for name, p in self.model.named_parameters() if is_quantizer_key(name)]

    def encoding_param_group(self, lr: float) -> dict[str, Any] | None:
        """The trainable encodings as one optimizer parameter group, or None without any (no range
        learning): learning rate ``lr`` of their own (scales are learned in log-scale, so Adam moves
        a scale by about ``lr`` *relative* per step) and no weight decay (decay would shrink the ranges)."""
        params = self.quantizer_parameters()
        return {"params": params, "weight_decay": 0.0, "lr": lr} if params else None

    def model_parameters(self) -> list[nn.Parameter]:
        """The model's own parameters (weights, biases), without quantizer parameters."""
        return [p for name, p in self.model.named_parameters() if not is_quantizer_key(name)]

    # ------------------------------------------------------------------ calibration
    def compute_encodings(self, forward_pass_callback: Callable[[nn.Module, Any], Any],
                          forward_pass_callback_args: Any = None) -> None:
        """Calibrate: set every weight encoding from the weights, then run
        ``forward_pass_callback(sim.model, args)`` and set every activation encoding.

        Runs in eval mode under ``torch.no_grad()``; weights are quantized while activation
        quantizers observe their float inputs and pass them through. No weight changes.
        Afterwards the model's train/eval mode is restored. Raises ``CalibrationError`` for
        NaN/inf data and for quantizers the callback never reached.
        """
        cfg = self.config
        for entry in self._built.params.values():
            q = entry.quantizer
            q.calibrate_on(entry.values(),
                           make_observer(cfg.param_quant_scheme, q.name, q.observer_axis, cfg.percentile))
        quantizers = {n: q for n, q in self._built.activations.items() if q.needs_calibration}
        was_training = self.model.training
        self.model.eval()
        sampled = {}
        for name, q in quantizers.items():
            sampled[name] = SampledObserver(make_observer(cfg.quant_scheme, q.name, None, cfg.percentile))
            q.start_observing(sampled[name])
        try:
            with torch.no_grad():
                forward_pass_callback(self.model, forward_pass_callback_args)
            unseen = [n for n, q in quantizers.items() if not q.observer.observed and q.enabled]
            if unseen:
                raise CalibrationError(
                    f"{len(unseen)} quantizer(s) saw no data during compute_encodings ({unseen[:3]}...): the "
                    "calibration callback must run sim.model on representative inputs"
                )
            for q in quantizers.values():
                if q.observer.observed:
                    q.stop_observing()
        finally:
            for q in quantizers.values():
                q.observer = None
            self.model.train(was_training)
        self.tensor_sqnr = tensor_sqnr(quantizers, {n: o.sample() for n, o in sampled.items()})
        # 20 dB flags outliers on grids of 8 bits and more; a 3- or 4-bit grid gives ~10-20 dB to any
        # tensor, so there the number says nothing about outliers and no warning is raised
        self.low_sqnr_tensors = {n: db for n, db in self.tensor_sqnr.items()
                                 if db < LOW_SQNR_DB and getattr(quantizers.get(n), "bitwidth", 8) >= OUTLIER_MIN_BITS}
        if self.low_sqnr_tensors:
            warnings.warn(warning_text(self.low_sqnr_tensors, cfg.output_bw), OutlierWarning, stacklevel=2)

    def outlier_overrides(self, bitwidth: int = 16) -> dict[str, dict[str, int]]:
        """The ``QuantConfig.overrides`` entries (merged with the config's own) that keep the tensors
        of ``low_sqnr_tensors`` (per-tensor SQNR < 20 dB at calibration) at ``bitwidth`` bits:
        ``QuantizationSimModel(model, dummy, replace(cfg, overrides=sim.outlier_overrides()))``."""
        return {**self.config.overrides, **{name: {"bitwidth": bitwidth} for name in self.low_sqnr_tensors}}

    @property
    def calibrated(self) -> bool:
        """True when every enabled quantizer has an encoding."""
        return all(q.calibrated for q in self._all_quantizers() if q.enabled)

    # ------------------------------------------------------------------ range learning health
    def collapsed_quantizers(self) -> list[str]:
        """Learned quantizers with a channel whose scale sits at its floor (one host sync)."""
        learned = [(n, q) for n, q in self._named_quantizers() if q.learnable and q.enabled]
        if not learned:
            return []
        hits = torch.stack([q.floor_hit().to("cpu", non_blocking=True) for _, q in learned]).tolist()
        return [n for (n, _), hit in zip(learned, hits) if hit]

    def _named_quantizers(self) -> list[tuple[str, QuantizeDequantize]]:
        return list(self._built.activations.items()) + [(n, e.quantizer) for n, e in self._built.params.items()]

    def warn_on_collapse(self) -> list[str]:
        """Warn (``EncodingCollapseWarning``, once per quantizer) for each newly collapsed scale."""
        new = [n for n in self.collapsed_quantizers() if n not in self._watched]
        for name in new:
            self._watched.add(name)
            warnings.warn(
                f"quantizer {name!r}: a learned scale reached its floor ({2**-10:g} x its calibrated value) after "
                "an optimizer step; its range no longer covers the data: lower the encodings' learning rate "
                "(qat.encoding_lr)", EncodingCollapseWarning, stacklevel=2)
        return new

    def watch_encodings(self, optimizer: torch.optim.Optimizer) -> Any:
        """Check learned scales after every ``optimizer.step()`` (``warn_on_collapse``); returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.warn_on_collapse())

    # ------------------------------------------------------------------ encodings
    def encodings(self) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
        """``(activation encodings, param encodings)`` as used now, by quantizer name."""
        acts = {name: q.encoding() for name, q in self._built.activations.items() if q.enabled and q.calibrated}
        params = {name: e.quantizer.encoding(e.values()) for name, e in self._built.params.items()
                  if e.quantizer.enabled}
        return acts, params

    def onnx_activation_name(self, name: str) -> str:
        """The name of quantizer ``name``'s tensor in the exported ONNX graph."""
        for out_name, qname in self._built.output_quantizer_names.items():
            if qname == name:
                return out_name
        return name

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
        """Set encodings from an AIMET-layout file (1.0.0 or 0.6.1), e.g. one ``sim.export`` wrote.

        Activation encodings are set as given. Learned weight encodings are set; weights whose
        encodings follow the weights are checked against the file (a mismatch means the file
        belongs to other weights). Names the model does not have, a wrong bit width, symmetry or
        channel count raise ``EncodingsFileError``; so do quantizers the file does not cover,
        unless ``partial=True``. Nothing is changed unless the whole file matches.
        """
        from .encodings_load import load_into

        load_into(self, encodings_path, partial)

    # ------------------------------------------------------------------ export
    def export(self, path: str, filename_prefix: str, dummy_input: Any = None, *,
               encoding_version: str | None = None) -> dict[str, str]:
        """Write ``{prefix}.pth``, ``{prefix}.onnx``, ``{prefix}.encodings`` under ``path``.

        ``encoding_version``: ``1.0.0``, ``0.6.1``, ``2.0.0`` or ``2.1.0``; None: 1.0.0, or 2.1.0
        when an encoding needs it (MX, NVFP4).

        LoRA adapters (``lora.add_lora``) are merged into their weights first, in place.

        Returns the three paths by kind (``pth``, ``onnx``, ``encodings``). See ``export.py``.
        """
        from .export import export_sim

        return export_sim(self, path, filename_prefix, self.dummy_input if dummy_input is None else dummy_input,
                          encoding_version)

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The original architecture's ``state_dict`` holding the trained weights, no quantizers.

        Folded BatchNorms become identities that add the folded bias where the layer had none
        (``running_var = 1 - eps``), so ``original.load_state_dict(...)`` in eval mode computes
        what ``sim.model`` computes with quantization disabled.
        """
        from .batchnorm_fold import identity_batchnorm_state

        out = dict(self.original_state_dict)
        current = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if not is_quantizer_key(k)}
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
        """Every quantizer (where it sits, bit width, encoding) and exactly what stays float, and why."""
        from .summary import render_summary

        return render_summary(self)

    def __str__(self) -> str:
        return self.summary()
