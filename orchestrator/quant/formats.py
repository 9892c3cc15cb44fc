"""Formats: the set of values a quantized tensor holds, before the scale is applied.

Two kinds, each a small frozen type; ``reference.py`` holds the one implementation of their math.

- ``IntFormat(bitwidth, symmetric)``: the integer grid of AIMET's encoding ``x = s * (q + o)``,
  ``q in [0, 2^b - 1]`` (``encoding.py``), ``b`` 2-16; rounding half to even.
- ``FloatFormat``: a minifloat with ``exponent_bits``/``mantissa_bits`` (IEEE-like: subnormals,
  no infinities in the scaled FP8/FP4 grids), its largest finite value ``max``, rounded to nearest,
  ties to even, and saturated to ``[-max, max]`` before rounding (``x_hat = s * cast(clamp(x/s))``).
  FP8 ``e4m3fn``/``e5m2`` round with torch's own float8 dtypes; FP4 ``e2m1`` (torch has only a
  packed storage type, no conversion) rounds with the generic minifloat rule in ``reference.py``,
  which is tested equal to torch's float8 casts for e4m3/e5m2. ``float16``/``bfloat16`` are plain
  casts (scale 1, no encoding; values beyond the float16 range become inf as in torch).

``FORMATS`` names the float formats; ``format_from_name(name, bitwidth, symmetric)`` builds either
kind from a config string (``"int"`` takes the bit width from ``param_bw``/``output_bw``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoding import qmax_of


@dataclass(frozen=True)
class IntFormat:
    """A ``bitwidth``-bit integer grid; ``symmetric``: offset ``-2^(b-1)``, else a learned/calibrated offset."""

    bitwidth: int
    symmetric: bool

    kind = "int"

    @property
    def name(self) -> str:
        return "int"

    @property
    def qmax(self) -> int:
        """``2^b - 1``: the grid holds ``q in [0, qmax]`` shifted by the offset."""
        return qmax_of(self.bitwidth)

    @property
    def is_float(self) -> bool:
        return False

    def label(self) -> str:
        return f"int{self.bitwidth} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class FloatFormat:
    """A float grid: ``exponent_bits``/``mantissa_bits``, exponent ``bias``, largest finite ``max``.

    ``scaled``: the grid is used under a scale (FP8/FP4); casts (fp16/bf16) have none.
    ``torch_dtype``: torch's dtype that rounds to exactly this grid (None: the generic rule).
    ``onnx_dtype``: the name of the ONNX/AIMET 2.x element type (``float8e4m3fn``), or None.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    scaled: bool
    torch_dtype: torch.dtype | None
    onnx_dtype: str | None

    kind = "float"
    symmetric = True

    @property
    def bitwidth(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def qmax(self) -> int:
        return 0  # no integer grid: the op's ``qmax`` argument is unused for float formats

    @property
    def is_float(self) -> bool:
        return True

    @property
    def min_normal_exponent(self) -> int:
        """Exponent of the smallest normal value, ``1 - bias``; below it the step stays ``2^(1-bias-m)``."""
        return 1 - self.bias

    def label(self) -> str:
        return self.name


FORMATS: dict[str, FloatFormat] = {
    # e4m3fn: no infinities, 0x7f/0xff are NaN, so the largest finite value is 1.75 * 2^8 = 448.
    "float8_e4m3fn": FloatFormat("float8_e4m3fn", 4, 3, 7, 448.0, True, torch.float8_e4m3fn, "float8e4m3fn"),
    # e5m2: IEEE-like; 1.75 * 2^15 = 57344.
    "float8_e5m2": FloatFormat("float8_e5m2", 5, 2, 15, 57344.0, True, torch.float8_e5m2, "float8e5m2"),
    # e2m1 (OCP MX FP4): values 0, 0.5, 1, 1.5, 2, 3, 4, 6.
    "float4_e2m1": FloatFormat("float4_e2m1", 2, 1, 1, 6.0, True, None, "float4e2m1"),
    "float16": FloatFormat("float16", 5, 10, 15, 65504.0, False, torch.float16, None),
    "bfloat16": FloatFormat("bfloat16", 8, 7, 127, float(torch.finfo(torch.bfloat16).max), False, torch.bfloat16,
                            None),
}
FORMAT_NAMES = ("int", *FORMATS)

Format = IntFormat | FloatFormat


def format_from_name(name: str, bitwidth: int, symmetric: bool) -> Format:
    """``"int"`` -> ``IntFormat(bitwidth, symmetric)``; a ``FORMATS`` name -> that float format."""
    if name == "int":
        return IntFormat(bitwidth, symmetric)
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"format {name!r} is not known; allowed: {', '.join(FORMAT_NAMES)}") from None
