"""QuantConfig: every knob of a quantization simulation, validated when it is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import QuantConfigError

MIN_BITWIDTH = 2
MAX_BITWIDTH = 16
QUANT_SCHEMES = ("min_max", "sqnr", "percentile")


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
        param_bw: bit width of conv/linear weight quantizers (2-16).
        output_bw: bit width of activation quantizers: model inputs and op outputs (2-16).
        quant_scheme: calibration scheme for activations: ``min_max`` (observed range),
            ``sqnr`` (histogram search minimising quantization noise) or ``percentile``.
        percentile: for ``percentile``: the activation range is the [100-p, p] percentile
            interval of the calibration data, p in [50, 100].
        per_channel: weights get one encoding per output channel (else one per tensor).
        range_learning: activation scale/offset are trainable ``nn.Parameter``s (LSQ/LSQ+);
            otherwise they stay exactly as calibrated.
        learn_weight_encodings: with ``range_learning``, weight scales are trained too
            (initialised from the weights); otherwise they are recomputed from the weights
            on every forward pass.
        lsq_grad_scaling: scale the LSQ gradients of learned encodings by ``1/sqrt(N*Qp)``
            (N: elements per sample of the quantized tensor, Qp: ``2^b - 1``).
        fold_batchnorm: fold BatchNorm that follows a conv/linear into its weights and bias
            before quantizing (the BN statistics then stop updating, as on the target).
        leaf_modules: qualified names of submodules that torch.fx must not trace into. Such a
            submodule runs as written; its output is quantized, its internals and weights are
            not (``sim.summary()`` lists them). The way out for code fx cannot trace.
    """

    param_bw: int = 8
    output_bw: int = 8
    quant_scheme: str = "min_max"
    percentile: float = 99.99
    per_channel: bool = True
    range_learning: bool = False
    learn_weight_encodings: bool = False
    lsq_grad_scaling: bool = True
    fold_batchnorm: bool = True
    leaf_modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_bitwidth("param_bw", self.param_bw)
        check_bitwidth("output_bw", self.output_bw)
        if self.quant_scheme not in QUANT_SCHEMES:
            raise QuantConfigError(
                f"quant_scheme={self.quant_scheme!r} is not known; allowed: {', '.join(QUANT_SCHEMES)}"
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

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (lists instead of tuples), for logging and crossing process boundaries."""
        out = asdict(self)
        out["leaf_modules"] = list(self.leaf_modules)
        return out
