"""Outlier check at calibration: which activation tensors their per-tensor encoding holds badly.

A per-tensor b-bit grid sized by a few large values (outlier channels of an LLM's residual
stream, large patch tokens beside a small CLS token) rounds everything else coarsely. While
``compute_encodings`` observes, ``SampledObserver`` keeps the first ~``SAMPLE`` elements of
each activation (whole batch entries); once the encodings are set, ``tensor_sqnr`` quantizes
each sample with its quantizer's encoding and returns its SQNR in dB with every channel
weighted equally (``slice_sqnr``: a plain SQNR is dominated by the outliers
themselves and would not see what they cost the rest). Tensors below
``LOW_SQNR_DB`` are reported by ``compute_encodings`` (``OutlierWarning``, and
``sim.low_sqnr_tensors``); ``sim.outlier_overrides()`` is the config switch that keeps them at
16 bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


LOW_SQNR_DB = 20.0  # per-tensor SQNR below which a tensor is reported
OUTLIER_MIN_BITS = 8  # ... on grids of at least this many bits (fewer bits give < 20 dB to any tensor)
SAMPLE = 1 << 15  # elements kept per quantizer


class OutlierWarning(UserWarning):
    """Activation tensors whose calibrated per-tensor encoding leaves < LOW_SQNR_DB of SQNR."""


class SampledObserver:
    """``observer`` (any calibration observer) plus the first samples of what it sees: whole
    leading batch entries (their structure kept: tokens, channels), at most ~``SAMPLE`` elements;
    a single entry larger than that keeps every p-th row of its last dimension."""

    def __init__(self, observer) -> None:
        self.inner = observer
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def observe(self, x: torch.Tensor) -> None:
        self.inner.observe(x)
        if self.kept >= SAMPLE or not x.is_floating_point() or x.dim() == 0 or x.numel() == 0:
            return
        if self.samples and x.shape[1:] != self.samples[0].shape[1:]:
            return
        per_entry = max(x[:1].numel(), 1)
        part = x.detach()[: max(1, (SAMPLE - self.kept) // per_entry)]
        if part.numel() > 4 * SAMPLE:  # one huge entry: strided rows of its last dimension
            rows = part.reshape(-1, part.shape[-1])
            part = rows[:: -(-rows.shape[0] * rows.shape[1] // SAMPLE)][None]
            if self.samples:
                return
        self.samples.append(part.float().cpu().clone())
        self.kept += part.numel()

    @property
    def observed(self) -> bool:
        return self.inner.observed

    def range(self, bitwidth: int, symmetric: bool):
        return self.inner.range(bitwidth, symmetric)

    def sample(self) -> torch.Tensor | None:
        return torch.cat(self.samples) if self.samples else None


def slice_sqnr(x: torch.Tensor, noise: torch.Tensor) -> float:
    """The SQNR (dB) that ``noise`` leaves ``x`` with every channel (slice of the last dim: the
    features of a token, the columns of an image row) weighted equally,
    ``-10 log10(mean over channels of noise power / signal power)``, and at most the plain SQNR.
    A few outlier channels dominate a plain SQNR (their power is most of the signal); here every
    other channel counts as much as they do. Channels with less than 1e-4 of the mean power
    (padding, dead channels, rotary components near sin 0) are left out: they hardly reach the
    next op."""
    x, noise = x.double(), noise.double()
    total = float(x.square().mean())
    if total == 0.0:
        return math.inf
    plain = _db(float(x.square().sum()), float(noise.square().sum()))
    if x.dim() < 2 or x.shape[-1] < 2:
        return plain
    signal = x.reshape(-1, x.shape[-1]).square().mean(0)
    ratio = noise.reshape(-1, x.shape[-1]).square().mean(0) / signal
    used = signal > 1e-4 * total
    if not used.any():
        return plain
    return min(plain, -10.0 * math.log10(max(float(ratio[used].mean()), 1e-300)))


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


@torch.no_grad()
def tensor_sqnr(quantizers: Mapping[str, torch.nn.Module], samples: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``slice_sqnr`` in dB of each enabled, calibrated quantizer on its sample."""
    out = {}
    for name, x in samples.items():
        q = quantizers[name]
        if not (q.enabled and q.calibrated) or x is None:
            continue
        noise = x - q(x.to(_device(q))).float().cpu()
        out[name] = slice_sqnr(x, noise)
    return out


def _device(q: torch.nn.Module) -> torch.device:
    return next((b.device for b in q.buffers()), next((p.device for p in q.parameters()), torch.device("cpu")))


def warning_text(low: Mapping[str, float], bitwidth: int) -> str:
    worst = sorted(low.items(), key=lambda kv: kv[1])
    shown = ", ".join(f"{n} ({db:.1f} dB)" for n, db in worst[:8])
    more = f" and {len(worst) - 8} more" if len(worst) > 8 else ""
    return (f"{len(worst)} activation tensor(s) keep less than {LOW_SQNR_DB:g} dB SQNR on their calibrated per-tensor "
            f"{bitwidth}-bit grid (outliers widen the range): {shown}{more}. Fix: QuantConfig(overrides="
            "sim.outlier_overrides()) keeps them at 16 bits (trials: quant.overrides), quant_scheme='percentile' "
            "clips the outliers, output_granularity='per_token' gives each token its own scale")
