"""Calibration observers: what a quantizer sees during ``compute_encodings``, turned into a range.

An observer sees every tensor its quantizer would quantize and then proposes the ``[min, max]``
range of its encoding, one entry per channel (shape ``[C]``; ``C = 1`` per tensor). Observers
are injected into quantizers by scheme name (``OBSERVERS``), for activations and weights alike:

- ``min_max``: the observed extremes (per tensor or per channel along ``axis``).
- ``percentile``: the ``[100-p, p]`` percentile interval of the observed values.
- ``sqnr``: the grid that minimises the expected quantization noise. Per tensor (activations,
  many batches): on a histogram, clipping noise weighted by ``CLIP_NOISE_WEIGHT`` (AIMET's
  ``tf_enhanced`` idea). Per channel (weights, seen once): an exact search over clipping
  ratios of each channel's own values (``ChannelMseObserver``).

Non-finite values (NaN, inf) in calibration data raise ``CalibrationError`` naming the quantizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .encoding import asymmetric_from_range, qmax_of, symmetric_from_range
from .errors import CalibrationError

PERCENTILE = 99.99  # the percentile observer's default clipping (of |x|), in percent

HISTOGRAM_BINS = 2048
# Larger tensors are histogrammed on an evenly strided subsample of at most this many elements
# (min/max always see every element); the stride is a prime so that it cannot fall in step with
# a channel or spatial period. Histogramming costs ~4 ms per million elements on CPU.
HISTOGRAM_SAMPLE = 1 << 17
SQNR_SEARCH_BINS = 512  # the sqnr search sees the histogram summed down to this many bins
SQNR_MAX_CANDIDATES = 32  # coarse fractions of the observed max searched
SQNR_MIN_CANDIDATES = 16  # coarse fractions of the observed min searched (when it is negative)
SQNR_REFINE = 9  # fine fractions searched around the best coarse ones (per side)
CLIP_NOISE_WEIGHT = 3.0
CHANNEL_SEARCH_RATIOS = tuple(i / 20 for i in range(6, 21))  # 0.30, 0.35, ..., 1.0


def _check_finite(name: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        raise CalibrationError(
            f"quantizer {name!r}: the calibration data holds NaN or inf values (observed range "
            f"[{float(lo.min())}, {float(hi.max())}]); calibrate on finite inputs"
        )


class MinMaxObserver:
    """Running min and max per channel (``axis``) or per tensor; no host sync per batch."""

    def __init__(self, name: str = "", axis: int | None = None) -> None:
        self.name = name
        self.axis = axis
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.axis is None:
            bmin, bmax = (v.reshape(1) for v in torch.aminmax(x))
        else:
            flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
            bmin, bmax = torch.aminmax(flat, dim=1)
        if self.min is None:
            self.min, self.max = bmin.float(), bmax.float()
        else:
            self.min = torch.minimum(self.min, bmin.float())
            self.max = torch.maximum(self.max, bmax.float())

    @property
    def observed(self) -> bool:
        return self.min is not None

    def range(self, bitwidth: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _check_finite(self.name, self.min, self.max)
        return self.min.cpu(), self.max.cpu()


class ChannelMseObserver:
    """Per-channel clipping search on the values themselves (weights: one ``observe`` call).

    For each channel, the symmetric (or asymmetric) grid of ``CHANNEL_SEARCH_RATIOS`` clipping
    ratios of the channel's min-max range with the least squared quantization error wins.
    Cost: one quantize-dequantize pass over the tensor per candidate ratio.
    """

    def __init__(self, name: str = "", axis: int | None = 0) -> None:
        self.name = name
        self.axis = axis
        self.values: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(1, -1) if self.axis is None else \
            x.detach().float().movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        self.values = flat if self.values is None else torch.cat([self.values, flat], dim=1)

    @property
    def observed(self) -> bool:
        return self.values is not None

    def range(self, bitwidth: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.values
        lo, hi = torch.aminmax(v, dim=1)
        _check_finite(self.name, lo, hi)
        best_err = torch.full_like(lo, float("inf"))
        best = torch.ones_like(lo)
        for ratio in CHANNEL_SEARCH_RATIOS:
            if symmetric:
                scale, offset = symmetric_from_range(lo * ratio, hi * ratio, bitwidth)
            else:
                scale, offset = asymmetric_from_range(lo * ratio, hi * ratio, bitwidth)
            s, o = scale[:, None], offset[:, None]
            q = torch.div(v, s).round_().clamp_(o, o + qmax_of(bitwidth)).mul_(s)
            err = (q - v).square_().sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, ratio), best)
        return (lo * best).cpu(), (hi * best).cpu()


class ChannelPercentileObserver(ChannelMseObserver):
    """Per-channel ``[100-p, p]`` percentile interval of the values (weights)."""

    def __init__(self, name: str = "", axis: int | None = 0, percentile: float = PERCENTILE) -> None:
        super().__init__(name, axis)
        self.percentile = float(percentile)

    def range(self, bitwidth: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.values
        lo, hi = torch.aminmax(v, dim=1)
        _check_finite(self.name, lo, hi)
        n = v.shape[1]
        k_hi = max(1, min(n, round(n * self.percentile / 100.0)))
        k_lo = max(1, min(n, n + 1 - k_hi))
        return torch.kthvalue(v, k_lo, dim=1).values.cpu(), torch.kthvalue(v, k_hi, dim=1).values.cpu()


def _next_prime(n: int) -> int:
    def prime(k: int) -> bool:
        return k >= 2 and all(k % d for d in range(2, int(k**0.5) + 1))

    while not prime(n):
        n += 1
    return n


def histogram_sample(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened, or every p-th element (p prime) when it has more than HISTOGRAM_SAMPLE."""
    flat = x.reshape(-1)
    if flat.numel() <= HISTOGRAM_SAMPLE:
        return flat
    return flat[:: _next_prime(-(-flat.numel() // HISTOGRAM_SAMPLE))]


def bin_counts(values: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Counts of ``values`` (all within ``[lo, hi]``) in ``bins`` equal bins, shape ``[bins]``;
    ``hi`` itself in the last bin. ``torch.histc``'s result, twice as fast on CPU (histc is a
    scalar loop): bin indices in vectorized ops, then ``bincount``."""
    index = values.float().sub(lo).mul_(bins / (hi - lo)).clamp_(0, bins - 1).to(torch.int64)
    return torch.bincount(index, minlength=bins)


class HistogramObserver:
    """A histogram of the observed values whose range grows with the data.

    When a batch falls outside the current range, the range is widened (to at least twice
    its width, so this happens rarely) and the old counts are re-binned by linear
    interpolation of their cumulative distribution.
    """

    def __init__(self, name: str = "", bins: int = HISTOGRAM_BINS) -> None:
        self.name = name
        self.bins = bins
        self.hist: torch.Tensor | None = None  # float64 counts, shape [bins]
        self.lo = 0.0
        self.hi = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    @property
    def observed(self) -> bool:
        return self.hist is not None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = torch.aminmax(x)
        _check_finite(self.name, lo, hi)
        bmin, bmax = float(lo), float(hi)
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        if self.hist is None:
            lo, hi = min(bmin, 0.0), max(bmax, 0.0)
            if hi - lo <= 0.0:
                hi = lo + 1e-8
            self.lo, self.hi = lo, hi
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        elif bmin < self.lo or bmax > self.hi:
            self._widen(bmin, bmax)
        self.hist += bin_counts(histogram_sample(x), self.bins, self.lo, self.hi).to(torch.float64).cpu()

    def _widen(self, bmin: float, bmax: float) -> None:
        width = self.hi - self.lo
        lo, hi = min(self.lo, bmin), max(self.hi, bmax)
        grow = max(0.0, 2.0 * width - (hi - lo))
        if bmin < self.lo:
            lo -= grow if bmax <= self.hi else grow / 2
        if bmax > self.hi:
            hi += grow if bmin >= self.lo else grow / 2
        old_edges = torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)
        new_edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.hist, 0)])
        new_cdf = _interp(new_edges, old_edges, cdf)
        self.hist = torch.diff(new_cdf).clamp(min=0.0)
        self.lo, self.hi = lo, hi

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)


class PercentileObserver(HistogramObserver):
    """Range = the ``[100-p, p]`` percentile interval, p in [50, 100]."""

    def __init__(self, name: str = "", percentile: float = PERCENTILE) -> None:
        super().__init__(name)
        self.percentile = float(percentile)

    def range(self, bitwidth: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.percentile >= 100.0:
            return torch.tensor([self.min]), torch.tensor([self.max])
        edges = self.edges()
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.hist, 0)])
        cdf = cdf / cdf[-1]
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
        lo, hi = _interp(q, cdf, edges).tolist()
        return torch.tensor([max(lo, self.min)]), torch.tensor([min(hi, self.max)])


class SqnrObserver(HistogramObserver):
    """Range = the asymmetric grid minimising expected quantization noise on the histogram.

    Coarse-to-fine: SQNR_MIN_CANDIDATES x SQNR_MAX_CANDIDATES fractions of the observed min and
    max, then a SQNR_REFINE x SQNR_REFINE grid one coarse step around the best pair.
    """

    def range(self, bitwidth: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._qmax = qmax_of(bitwidth)
        self._bitwidth = bitwidth
        edges = torch.linspace(self.lo, self.hi, SQNR_SEARCH_BINS + 1, dtype=torch.float64)
        self._left, self._right = edges[:-1].float(), edges[1:].float()
        self._centers = (self._left + self._right) / 2
        self._counts = self.hist.reshape(SQNR_SEARCH_BINS, -1).sum(dim=1).float()
        top, bottom = max(self.max, 0.0), min(self.min, 0.0)
        max_f, min_f = _fractions(SQNR_MAX_CANDIDATES), _fractions(SQNR_MIN_CANDIDATES if bottom < 0 else 1)
        best_min_f, best_max_f = self._best(min_f, max_f, bottom, top)
        fine_max = _around(best_max_f, 1.0 / SQNR_MAX_CANDIDATES)
        fine_min = _around(best_min_f, 1.0 / SQNR_MIN_CANDIDATES) if bottom < 0 else min_f
        best_min_f, best_max_f = self._best(fine_min, fine_max, bottom, top)
        scale, offset = asymmetric_from_range(torch.tensor([bottom * best_min_f]), torch.tensor([top * best_max_f]),
                                              bitwidth)
        return scale * offset, scale * (offset + self._qmax)

    def _best(self, min_f: torch.Tensor, max_f: torch.Tensor, bottom: float, top: float) -> tuple[float, float]:
        """The (min fraction, max fraction) pair of least expected noise."""
        fm, fx = torch.meshgrid(min_f, max_f, indexing="ij")
        fm, fx = fm.reshape(-1), fx.reshape(-1)
        scale, offset = asymmetric_from_range(bottom * fm, top * fx, self._bitwidth)
        scale, offset = scale[:, None], offset[:, None]  # [K, 1]
        gmin, gmax = scale * offset, scale * (offset + self._qmax)
        # Rounding noise of values uniform in each bin, integrated exactly over the part of the
        # bin inside the grid; clipped values cost CLIP_NOISE_WEIGHT * squared clip distance.
        left, right, centers = self._left[None, :], self._right[None, :], self._centers[None, :]
        a, b = torch.clamp(left, gmin, gmax), torch.clamp(right, gmin, gmax)
        rounding = (_rounding_noise_integral(b, scale) - _rounding_noise_integral(a, scale)) / (right - left)
        clipped = (centers - torch.clamp(centers, gmin, gmax)) ** 2
        noise = (self._counts[None, :] * (rounding + CLIP_NOISE_WEIGHT * clipped)).sum(dim=1)
        best = int(torch.argmin(noise))
        return float(fm[best]), float(fx[best])


def _around(center: float, step: float) -> torch.Tensor:
    """SQNR_REFINE fractions in ``[center - step, center + step]`` clipped to ``(0, 1]``."""
    values = torch.linspace(center - step, center + step, SQNR_REFINE)
    return values.clamp(step / SQNR_REFINE, 1.0)


def _fractions(n: int) -> torch.Tensor:
    return torch.linspace(1.0 / n, 1.0, n)


def _rounding_noise_integral(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``G(x) = integral from -s/2 to x of (t - s*round(t/s))^2 dt`` (periodic with period s)."""
    y = x + scale / 2
    periods = torch.floor(y / scale)
    r = y - periods * scale
    half = scale / 2
    return periods * scale**3 / 12 + ((r - half) ** 3 + half**3) / 3


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for increasing ``xp`` (flat segments allowed), in torch float64."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    span = x1 - x0
    t = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    out = f0 + t.clamp(0.0, 1.0) * (f1 - f0)
    return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], out))


ObserverFactory = Callable[[str, "int | None", float], object]


def _sqnr(name: str, axis: int | None, percentile: float):
    return SqnrObserver(name) if axis is None else ChannelMseObserver(name, axis)


def _percentile(name: str, axis: int | None, percentile: float):
    return PercentileObserver(name, percentile) if axis is None else ChannelPercentileObserver(name, axis, percentile)


# Calibration scheme -> factory(quantizer name, channel axis or None, percentile) -> observer.
# A new scheme is one entry here.
OBSERVERS: dict[str, ObserverFactory] = {
    "min_max": lambda name, axis, percentile: MinMaxObserver(name, axis),
    "sqnr": _sqnr,
    "percentile": _percentile,
}


def make_observer(scheme: str, name: str = "", axis: int | None = None, percentile: float = PERCENTILE):
    """The observer of calibration ``scheme`` for a quantizer (per channel along ``axis``)."""
    try:
        factory = OBSERVERS[scheme]
    except KeyError:
        raise ValueError(f"unknown calibration scheme {scheme!r}; allowed: {', '.join(OBSERVERS)}") from None
    return factory(name, axis, percentile)
