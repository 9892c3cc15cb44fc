"""QuantConfig: every knob of a quantization simulation, validated when it is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import QuantConfigError
from .block_formats import ACTIVATION_BLOCK_FORMATS, BLOCK_FORMATS
from .formats import FORMAT_NAMES, FORMATS
from .observers import OBSERVERS, PERCENTILE
from .placement import ACTIVATION_SITES

MIN_BITWIDTH = 2
MAX_BITWIDTH = 16
QUANT_SCHEMES = tuple(OBSERVERS)
OVERRIDE_KEYS = {"bitwidth": int, "enabled": bool, "format": str, "block_size": int, "granularity": str}
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
# Calibration schemes that hold for float formats (``sqnr`` searches an integer grid).
FLOAT_SCHEMES = ("min_max", "percentile")
# Weight formats: element formats and block formats (``block_formats.py``: lpbq, mxfp8, mxfp4, nvfp4, ...).
PARAM_FORMAT_NAMES = (*FORMAT_NAMES, *BLOCK_FORMATS)
# Activation formats: element formats and the block formats with dynamic blocks (mxfp8, mxfp4, nvfp4, ...).
OUTPUT_FORMAT_NAMES = (*FORMAT_NAMES, *ACTIVATION_BLOCK_FORMATS)


@dataclass(frozen=True)
class QuantizerSettings:
    """What ``QuantConfig`` says about one quantizer after ``overrides``.

    ``format``: ``"int"`` (``bitwidth`` bits) or a ``formats.FORMATS`` name. Weights:
    ``block_size`` > 0 quantizes per block of that many input elements (per output channel);
    ``per_channel`` otherwise. Activations: ``granularity`` ``per_tensor`` (calibrated) or
    ``per_token`` (dynamic); an activation in a block format (MX, NVFP4) is dynamic per block of
    its last dim whatever ``granularity`` says.
    """

    bitwidth: int
    enabled: bool
    format: str
    block_size: int
    per_channel: bool
    granularity: str


def check_bitwidth(name: str, value: Any) -> int:
    """Return ``value`` as a bit width, or raise naming ``name``, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITWIDTH <= value <= MAX_BITWIDTH:
        raise QuantConfigError(
            f"{name}={value!r} is not a supported bit width; allowed: an integer from "
            f"{MIN_BITWIDTH} to {MAX_BITWIDTH}"
        )
    return value


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise QuantConfigError(f"{name}={value!r} must be true or false")


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized.

    Attributes:
        param_bw: bit width of weight quantizers (2-16).
        output_bw: bit width of activation quantizers: model inputs and op outputs (2-16).
        quant_scheme: calibration of activations: ``sqnr`` (the default: a histogram search for the
            clipping range with the least quantization noise, AIMET's ``tf_enhanced``), ``min_max``
            (the observed range) or ``percentile``. Chosen by measurement (benchmarks/RESULTS.md,
            "Default activation calibration"): on MNIST-1D PTQ W4A4 +4.1 and W3A3 +24 points over
            min_max, static QAT +2.5-3.7; on BERT/Llama/ViT W8A8 +0.3 to +1.6 dB output SQNR.
        param_quant_scheme: calibration of weights, the same names: ``sqnr`` searches each
            channel's clipping ratio for the least squared error, ``percentile`` clips each
            channel at its percentile. Weight encodings keep following the weights during
            training with that clipping ratio.
        percentile: for ``percentile``: the range is the [100-p, p] percentile interval, p in [50, 100].
        per_channel: weights get one encoding per output channel (else one per tensor).
        range_learning: activation scale/offset are trainable ``nn.Parameter``s (LSQ/LSQ+);
            otherwise they stay exactly as calibrated.
        learn_weight_encodings: with ``range_learning``, weight scales are trained too
            (initialised from calibration); otherwise they follow the weights.
        lsq_grad_scaling: scale the LSQ gradients of learned encodings by ``1/sqrt(N*Qp)``
            (N: elements per encoding, per sample for activations; Qp: ``2^b - 1``).
        fold_batchnorm: fold BatchNorm that follows a conv/linear into its weights and bias
            before quantizing (the BN statistics then stop updating, as on the target).
        leaf_modules: qualified names of submodules run exactly as written: no quantizer inside
            (weights and intermediate results stay float), their outputs quantized.
            ``sim.summary()`` lists them.
        overrides: per-quantizer settings by wildcard pattern on quantizer names (``fnmatch``),
            applied in order: ``{"*.attention.output.LayerNorm": {"bitwidth": 16},
            "classifier.*": {"enabled": False}}``. Names are those ``sim.summary()`` lists
            (parameter names for weights). The tool for outliers: keep the few tensors whose
            ranges per-tensor 8 bits cannot hold at 16 bits, or float. Keys: ``bitwidth``,
            ``enabled``, ``format``, ``block_size`` (weights; 0: per channel), ``granularity``
            (``per_tensor``/``per_channel`` for weights, ``per_tensor``/``per_token`` for activations):
            mixed precision by name, e.g. ``{"*.self_attn.*": {"format": "float8_e4m3fn"},
            "*.mlp.*": {"block_size": 32, "bitwidth": 4}, "lm_head.*": {"bitwidth": 8}}``.
        param_format, output_format: ``int`` (``param_bw``/``output_bw`` bits) or a float format:
            ``float8_e4m3fn``, ``float8_e5m2``, ``float4_e2m1`` (scaled: weights per channel,
            activations per tensor), ``float16``, ``bfloat16`` (plain casts). Weights also take a
            block format (``block_formats.py``): ``lpbq`` (AIMET's LPBQ: ``param_bw``-bit integers
            in blocks of ``param_block_size``, integer block scales under a float per-channel
            scale), ``mxfp8``/``mxfp8_e5m2``/``mxfp4``/``mxint8`` (OCP MX: E8M0 scale per 32) and
            ``nvfp4`` (e4m3 scale per 16 under a float32 per-tensor scale). MX and NVFP4 scales
            follow the weights by the format's own rule (``param_quant_scheme`` ``min_max``, no
            ``learn_weight_encodings``); LPBQ learns its per-channel scale. Weights whose layer
            type declares no axes (a norm's scale used by ``mul``) take the element format per
            tensor. Activations take the MX and NVFP4 block formats too (``output_format: nvfp4``):
            dynamic, each block of 32 (16) elements along the last dim scaled from its own values
            at run time by the format's rule (NVFP4's per-tensor scale from the whole tensor); no
            calibration, nothing learned.
        param_block_size: > 0: integer weights per block of this many elements along the
            layer's input axis (group-wise int4: 32/64/128), one scale per (output channel,
            block); 0: per channel (``per_channel``). A block larger than the input dim is one
            block per row; an input dim that is not a multiple of it is an error.
        output_granularity: ``per_tensor`` (calibrated, as before) or ``per_token``: dynamic,
            each token's scale from its own values at run time (torchao's 8da4w activations).
        quantize_activations: False leaves every activation float (weight-only quantization).
        activation_sites: where activation quantizers go: ``outputs`` (AIMET's placement: every
            model input and compute op output, ``placement.py``) or ``layer_inputs`` (torchao's
            8da4w and ModelOpt's W4A4/NVFP4: only the values that enter a conv/linear layer; norms,
            residual adds, softmax and the attention's matmuls stay float).
    """

    param_bw: int = 8
    output_bw: int = 8
    quant_scheme: str = "sqnr"
    param_quant_scheme: str = "min_max"
    percentile: float = PERCENTILE
    per_channel: bool = True
    range_learning: bool = False
    learn_weight_encodings: bool = False
    lsq_grad_scaling: bool = True
    fold_batchnorm: bool = True
    leaf_modules: tuple[str, ...] = field(default_factory=tuple)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    param_format: str = "int"
    output_format: str = "int"
    param_block_size: int = 0
    output_granularity: str = "per_tensor"
    quantize_activations: bool = True
    activation_sites: str = "outputs"

    def __post_init__(self) -> None:
        check_bitwidth("param_bw", self.param_bw)
        check_bitwidth("output_bw", self.output_bw)
        for key in ("quant_scheme", "param_quant_scheme"):
            if getattr(self, key) not in QUANT_SCHEMES:
                raise QuantConfigError(
                    f"{key}={getattr(self, key)!r} is not known; allowed: {', '.join(QUANT_SCHEMES)}"
                )
        pct = self.percentile
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 50.0 <= pct <= 100.0:
            raise QuantConfigError(f"percentile={pct!r} is outside the allowed range [50, 100]")
        for name in ("per_channel", "range_learning", "learn_weight_encodings", "lsq_grad_scaling",
                     "fold_batchnorm"):
            _check_bool(name, getattr(self, name))
        if self.learn_weight_encodings and not self.range_learning:
            raise QuantConfigError(
                "learn_weight_encodings=True needs range_learning=True; without range learning "
                "weight encodings follow the weights"
            )
        leaves = self.leaf_modules
        if isinstance(leaves, str) or not all(isinstance(n, str) and n for n in leaves):
            raise QuantConfigError(
                f"leaf_modules={leaves!r} must be a list of submodule names such as ['layer1.0']"
            )
        object.__setattr__(self, "leaf_modules", tuple(leaves))
        object.__setattr__(self, "overrides", _check_overrides(self.overrides))
        _check_format("param_format", self.param_format, is_param=True)
        _check_format("output_format", self.output_format, is_param=False)
        _check_block_size("param_block_size", self.param_block_size)
        _check_choice("output_granularity", self.output_granularity, ACTIVATION_GRANULARITIES)
        _check_bool("quantize_activations", self.quantize_activations)
        _check_choice("activation_sites", self.activation_sites, ACTIVATION_SITES)
        if self.param_block_size and not self.per_channel:
            raise QuantConfigError(f"param_block_size={self.param_block_size} needs per_channel=True (blocks are "
                                   "per output channel); allowed: 0 with per_channel=False")
        for key, fmt in (("param_quant_scheme", self.param_format), ("quant_scheme", self.output_format)):
            if fmt in FORMATS and getattr(self, key) not in FLOAT_SCHEMES:
                raise QuantConfigError(f"{key}={getattr(self, key)!r} is not available for format {fmt!r} (the sqnr "
                                       f"search is for integer grids); allowed: {', '.join(FLOAT_SCHEMES)}")
        if self.param_format in BLOCK_FORMATS:
            if not self.per_channel:
                raise QuantConfigError(f"param_format={self.param_format!r} needs per_channel=True (its blocks are "
                                       "per output channel); allowed: per_channel=True")
            _check_block_format("param_format", self.param_format, self.param_block_size, self.param_quant_scheme,
                                self.learn_weight_encodings)

    def settings_for(self, name: str, bitwidth: int) -> tuple[int, bool]:
        """``(bitwidth, enabled)`` of the quantizer called ``name`` after ``overrides``."""
        import fnmatch

        enabled = True
        for pattern, values in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                bitwidth = values.get("bitwidth", bitwidth)
                enabled = values.get("enabled", enabled)
        return bitwidth, enabled

    def quantizer_settings(self, name: str, is_param: bool) -> QuantizerSettings:
        """Everything this config says about quantizer ``name`` (a weight when ``is_param``), after ``overrides``."""
        import fnmatch

        if is_param:
            values = {"bitwidth": self.param_bw, "enabled": True, "format": self.param_format,
                      "block_size": self.param_block_size,
                      "granularity": "per_channel" if self.per_channel else "per_tensor"}
        else:
            values = {"bitwidth": self.output_bw, "enabled": self.quantize_activations, "format": self.output_format,
                      "block_size": 0, "granularity": self.output_granularity}
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                values.update(override)
        allowed = ("per_tensor", "per_channel") if is_param else ACTIVATION_GRANULARITIES
        _check_choice(f"granularity of {name!r}", values["granularity"], allowed)
        if values["block_size"] and not is_param:
            raise QuantConfigError(f"block_size={values['block_size']} for activation {name!r}: blocks are for "
                                   "weights; allowed for activations: 0")
        if values["format"] in BLOCK_FORMATS and not is_param:
            if values["format"] not in ACTIVATION_BLOCK_FORMATS:
                raise QuantConfigError(f"format {values['format']!r} for activation {name!r}: LPBQ is for weights; "
                                       f"allowed for activations: {', '.join(OUTPUT_FORMAT_NAMES)}")
        elif values["format"] in BLOCK_FORMATS:
            _check_block_format(f"format of {name!r}", values["format"], values["block_size"],
                                self.param_quant_scheme, self.learn_weight_encodings)
            if values["granularity"] != "per_channel":
                raise QuantConfigError(f"format {values['format']!r} for {name!r} with granularity "
                                       f"{values['granularity']!r}: its blocks are per output channel; allowed: "
                                       "granularity 'per_channel'")
        elif values["format"] in FORMATS and values["block_size"]:
            raise QuantConfigError(f"{name!r}: format {values['format']!r} with block_size={values['block_size']} "
                                   "is not supported yet; allowed: block sizes with format 'int'")
        return QuantizerSettings(values["bitwidth"], values["enabled"], values["format"], values["block_size"],
                                 values["granularity"] == "per_channel" or bool(values["block_size"]),
                                 values["granularity"])

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (lists instead of tuples), for logging and crossing process boundaries."""
        out = asdict(self)
        out["leaf_modules"] = list(self.leaf_modules)
        return out


def _check_overrides(overrides: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(overrides, dict):
        raise QuantConfigError(f"overrides={overrides!r} must map name patterns to settings, e.g. "
                               "{'*.LayerNorm': {'bitwidth': 16}}")
    out = {}
    for pattern, values in overrides.items():
        if not isinstance(pattern, str) or not pattern or not isinstance(values, dict):
            raise QuantConfigError(f"overrides[{pattern!r}]={values!r} must map a name pattern to settings "
                                   f"with keys {', '.join(OVERRIDE_KEYS)}")
        for key, value in values.items():
            if key not in OVERRIDE_KEYS:
                raise QuantConfigError(f"overrides[{pattern!r}].{key} is not a setting; allowed: "
                                       f"{', '.join(OVERRIDE_KEYS)}")
            where = f"overrides[{pattern!r}].{key}"
            if key == "bitwidth":
                check_bitwidth(where, value)
            elif key == "format":
                _check_format(where, value, is_param=True)
            elif key == "block_size":
                _check_block_size(where, value)
            elif key == "granularity":
                _check_choice(where, value, ("per_tensor", "per_channel", "per_token"))
            else:
                _check_bool(where, value)
        out[pattern] = dict(values)
    return out


def _check_format(name: str, value: Any, is_param: bool) -> None:
    allowed = PARAM_FORMAT_NAMES if is_param else OUTPUT_FORMAT_NAMES
    if value not in allowed:
        extra = " (LPBQ is for weights)" if value in BLOCK_FORMATS else ""
        raise QuantConfigError(f"{name}={value!r} is not a known format{extra}; allowed: {', '.join(allowed)}")


def _check_block_format(name: str, fmt: str, block_size: int, scheme: str, learn: bool) -> None:
    """A block format's own constraints: LPBQ needs a block size; MX/NVFP4 fix theirs, calibrate by
    the format's rule (min_max) and do not learn their scales."""
    bf = BLOCK_FORMATS[fmt]
    if bf.block_size == 0 and not block_size:
        raise QuantConfigError(f"{name}={fmt!r} needs a block size; allowed: param_block_size (or an override's "
                               "block_size) > 0, e.g. 64")
    if bf.block_size and block_size not in (0, bf.block_size):
        raise QuantConfigError(f"{name}={fmt!r} has blocks of {bf.block_size} by definition, not {block_size}; "
                               f"allowed: block size 0 or {bf.block_size}")
    if not bf.learnable and learn:
        raise QuantConfigError(f"{name}={fmt!r} with learn_weight_encodings=True: its block scales are derived from "
                               "the weights by the format's rule and are not learned; allowed: "
                               "learn_weight_encodings=False (or format lpbq, int or a float format)")
    if not bf.learnable and scheme != "min_max":
        raise QuantConfigError(f"{name}={fmt!r} with param_quant_scheme={scheme!r}: its block scales come from each "
                               "block's maximum by the format's rule; allowed: param_quant_scheme='min_max'")


def _check_block_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QuantConfigError(f"{name}={value!r} is not a block size; allowed: 0 (no blocks) or a positive "
                               "integer such as 32, 64, 128")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise QuantConfigError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")
