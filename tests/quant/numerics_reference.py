"""References for quantizer numerics tests: the contract written in numpy, and inputs that tell
implementations apart (exact .5 ties, values where ``x * (1/s)`` and ``x / s`` round differently)."""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.quant import QuantizeDequantize
from orchestrator.quant.encoding import qmax_of
from orchestrator.quant.formats import FORMATS


def float_grid(name: str) -> np.ndarray:
    """Every finite non-negative value of a float format, in code order (= increasing order),
    enumerated from its (exponent, mantissa, bias)."""
    f = FORMATS[name]
    values = []
    for e in range(1 << f.exponent_bits):
        for m in range(1 << f.mantissa_bits):
            v = (m / (1 << f.mantissa_bits)) * 2.0 ** (1 - f.bias) if e == 0 else \
                (1 + m / (1 << f.mantissa_bits)) * 2.0 ** (e - f.bias)
            if v <= f.max:
                values.append(v)
    return np.array(values, dtype=np.float64)


def nearest_float(u: np.ndarray, name: str) -> np.ndarray:
    """``u`` saturated to the format's range and rounded to its nearest value, ties to the even
    code (the even mantissa); float64."""
    grid = float_grid(name)
    a = np.minimum(np.abs(u.astype(np.float64)), grid[-1])
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.sign(u) * grid[pick]


def numpy_qdq(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, bitwidth: int) -> np.ndarray:
    """The contract in numpy float32: ``s * clip(round(x / s), o, o + 2^b - 1)`` (np.round: half to even).
    ``scale``/``offset`` broadcast against ``x``."""
    x, s, o = np.float32(x), np.float32(scale), np.float32(offset)
    r = np.round(x / s)
    return (s * np.clip(r, o, o + np.float32(qmax_of(bitwidth)))).astype(np.float32)


def fixed(bitwidth: int, scale, offset, symmetric: bool = False, axis: int | None = None) -> QuantizeDequantize:
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    q = QuantizeDequantize("t", bitwidth, symmetric=symmetric, channels=scale.numel(), axis=axis)
    q.set_encoding(scale, torch.as_tensor(offset, dtype=torch.float32).reshape(-1))
    return q


def division_differs(scale: float, n: int = 4000, seed: int = 0) -> np.ndarray:
    """float32 values whose ``x / s`` and ``x * (1/s)`` round to different integers (the one-step
    disagreements of issue 9: e.g. w/s = 68.500007629)."""
    rng = np.random.default_rng(seed)
    s = np.float32(scale)
    inv = np.float32(1) / s
    k = rng.integers(-300, 300, n).astype(np.float32)
    found = []
    base = ((k + np.float32(0.5)) * s).astype(np.float32)
    for ulps in range(-3, 4):  # values within a few ulps of each exact half step
        x = base
        for _ in range(abs(ulps)):
            x = np.nextafter(x, np.float32(np.inf if ulps > 0 else -np.inf)).astype(np.float32)
        found.append(x[np.round(x / s) != np.round(x * inv)])
    out = np.unique(np.concatenate(found))
    assert out.size > 0, "no value where division and multiplication round differently"
    return out


def values_with_ties(scale: float, offset: int, bitwidth: int, n: int = 3000, seed: int = 0) -> np.ndarray:
    """Random values over and beyond the grid, exact .5 ties (scale a power of two), both ends, 0."""
    rng = np.random.default_rng(seed + bitwidth)
    qmax = qmax_of(bitwidth)
    lo, hi = scale * offset, scale * (offset + qmax)
    span = hi - lo
    rand = rng.uniform(lo - 0.2 * span, hi + 0.2 * span, n)
    k = rng.integers(offset - 2, offset + qmax + 2, n)
    ties = (k + 0.5) * scale
    return np.concatenate([rand, ties, [0.0, lo, hi]]).astype(np.float32)
