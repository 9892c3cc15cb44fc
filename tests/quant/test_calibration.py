"""Calibration: the observers of the three schemes (activations and weights), eval mode without
gradients and without weight changes, and one clear error for data it cannot use."""

from __future__ import annotations

import pytest
import torch
from helpers import run_batches
from torch import nn

from orchestrator.quant import CalibrationError, QuantConfig, QuantizationSimModel, QuantizeDequantize
from orchestrator.quant.observers import (
    ChannelMseObserver,
    ChannelPercentileObserver,
    HistogramObserver,
    PercentileObserver,
    SqnrObserver,
    bin_counts,
    make_observer,
)


def test_min_max_uses_observed_extremes(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(quant_scheme="min_max"))
    sim.compute_encodings(run_batches, calibration_batches)
    x = torch.cat(calibration_batches)
    enc = sim.activation_quantizers()["x"].encoding()
    # the input quantizer sees the raw pixels (all >= 0): range [0, max(x)]
    assert float(enc.min) == 0.0
    assert abs(float(enc.max) - float(x.max())) <= float(enc.scale)


def test_percentile_of_a_known_distribution():
    obs = PercentileObserver("p", 99.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # several batches exercise re-binning
        obs.observe(torch.rand(50_000, generator=gen) * 10.0 - 2.0)
    obs.observe(torch.tensor([1000.0]))  # one outlier widens the histogram a lot
    lo, hi = (float(v) for v in obs.range(8, False))
    assert abs(lo - (-2.0 + 0.1)) < 0.3 and abs(hi - (8.0 - 0.1)) < 0.3, (lo, hi)
    full = PercentileObserver("p", 100.0)  # p = 100 is min-max
    full.observe(torch.tensor([-1.0, 3.0]))
    assert [float(v) for v in full.range(8, False)] == [-1.0, 3.0]


@pytest.mark.parametrize("lo, hi", [(0.0, 5.0), (-3.0, 7.5), (-1e-3, 2e-3)])
def test_bin_counts_match_histc(lo, hi):
    torch.manual_seed(0)
    values = torch.rand(200_000) * (hi - lo) + lo
    values[:3] = torch.tensor([lo, hi, (lo + hi) / 2])  # both ends and a bin edge
    counts = bin_counts(values, 2048, lo, hi)
    reference = torch.histc(values, 2048, lo, hi)
    assert counts.sum() == values.numel() and counts[0] >= 1 and counts[-1] >= 1
    # a value within a float32 rounding of a bin edge may land in the neighbouring bin
    assert (counts.float() - reference).abs().sum() <= 2e-4 * values.numel()


def test_histogram_rebinning_keeps_counts():
    obs = HistogramObserver("h", bins=64)
    obs.observe(torch.linspace(0, 1, 1000))
    obs.observe(torch.linspace(-5, 7, 1000))
    assert abs(float(obs.hist.sum()) - 2000) < 1e-6
    assert obs.lo <= -5 and obs.hi >= 7


def mse_at(data: torch.Tensor, rmin: float, rmax: float, bits: int) -> float:
    q = QuantizeDequantize("t", bits, symmetric=False)
    q.set_range(torch.tensor([rmin]), torch.tensor([rmax]))
    return float(((q(data) - data) ** 2).mean())


def test_sqnr_clips_outliers_and_beats_min_max_noise():
    gen = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(200_000, generator=gen).abs(), torch.tensor([60.0])])  # ReLU-like + outlier
    obs = SqnrObserver("s")
    obs.observe(data)
    lo, hi = (float(v) for v in obs.range(4, False))
    assert lo == 0.0 and 2.0 < hi < 20.0, (lo, hi)  # clips the single outlier at 60
    assert mse_at(data, lo, hi, 4) < 0.5 * mse_at(data, 0.0, 60.0, 4)


def test_weight_schemes_search_per_channel_clipping():
    """``param_quant_scheme``: sqnr searches each channel's clipping ratio (never worse than min-max,
    better on a heavy-tailed channel), percentile clips each channel at its percentile."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=gen)
    w[1, 0] = 8.0  # one outlier in channel 1
    mm = make_observer("min_max", "w", 0)
    mm.observe(w)
    sq = make_observer("sqnr", "w", 0)
    assert isinstance(sq, ChannelMseObserver)
    sq.observe(w)
    pc = make_observer("percentile", "w", 0, percentile=99.0)
    assert isinstance(pc, ChannelPercentileObserver)
    pc.observe(w)

    def channel_mse(rng):
        lo, hi = rng
        q = QuantizeDequantize("w", 4, symmetric=True, channels=4, axis=0)
        q.set_range(lo, hi)
        return ((q(w) - w) ** 2).mean(dim=1)

    mse_mm, mse_sq = channel_mse(mm.range(4, True)), channel_mse(sq.range(4, True))
    assert torch.all(mse_sq <= mse_mm * (1 + 1e-6)), (mse_sq, mse_mm)
    assert mse_sq[1] < 0.9 * mse_mm[1], (mse_sq, mse_mm)
    _, hi_pc = pc.range(4, True)
    assert hi_pc[1] < 5.0 and torch.all(hi_pc <= w.amax(1))


def test_weight_clipping_ratio_persists_while_weights_follow(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(param_bw=4, param_quant_scheme="sqnr"))
    sim.compute_encodings(run_batches, calibration_batches)
    entry = sim.quantized_params()["conv2.weight"]
    ratio = entry.quantizer.ratio.clone()
    assert torch.all(ratio <= 1.0) and torch.any(ratio < 1.0), ratio
    with torch.no_grad():
        entry.param.mul_(2.0)
    enc = entry.quantizer.encoding(entry.param)
    full = entry.param.detach().abs().reshape(32, -1).amax(1)
    # the encoding follows the doubled weights with the same clipping ratio
    expected = torch.maximum(entry.param.detach().reshape(32, -1).amax(1) / 7,
                             -entry.param.detach().reshape(32, -1).amin(1) / 8) * ratio
    assert torch.allclose(enc.scale, expected, rtol=1e-6) and torch.all(enc.scale * 7 <= full * 1.0001)


@pytest.mark.parametrize("scheme", ["min_max", "sqnr", "percentile"])
def test_calibration_runs_in_eval_mode_without_grad_and_changes_no_weights(pretrained, calibration_batches, scheme):
    cfg = QuantConfig(quant_scheme=scheme, param_quant_scheme=scheme, fold_batchnorm=False)  # BN stats must not move
    sim = QuantizationSimModel(pretrained, calibration_batches[0], cfg)
    sim.model.train()
    before = {k: v.clone() for k, v in sim.model.state_dict().items() if "quantizers" not in k}
    seen = []

    def callback(model, batches):
        seen.append((model.training, torch.is_grad_enabled()))
        run_batches(model, batches)

    sim.compute_encodings(callback, calibration_batches)
    assert seen == [(False, False)]
    assert sim.model.training  # mode restored
    after = {k: v for k, v in sim.model.state_dict().items() if "quantizers" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sim.calibrated


def test_schemes_give_different_ranges_on_real_data(pretrained, calibration_batches):
    maxima = {}
    for scheme in ("min_max", "sqnr", "percentile"):
        sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(quant_scheme=scheme, output_bw=4))
        sim.compute_encodings(run_batches, calibration_batches)
        maxima[scheme] = float(sim.activation_quantizers()["relu4"].encoding().max)
    assert maxima["sqnr"] < maxima["min_max"], maxima
    assert maxima["percentile"] <= maxima["min_max"], maxima


class Gate(nn.Module):
    """Data-dependent control flow: the ``tanh`` branch only runs for inputs with a positive sum."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(8) * 0.5)
            self.fc.bias.fill_(0.1)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = torch.tanh(h) * 2
        return h


def test_quantizer_never_reached_is_reported():
    sim = QuantizationSimModel(Gate(), torch.ones(4, 8), QuantConfig())
    with pytest.raises(CalibrationError, match="saw no data") as err:
        sim.compute_encodings(lambda m, _: None)
    assert "\n" not in str(err.value)
    # calibration data that never takes the captured branch: its quantizers are named
    with torch.no_grad():
        sim.model.fc.bias.fill_(-100.0)
    with pytest.raises(CalibrationError, match=r"saw no data.*'tanh_0'"):
        sim.compute_encodings(lambda m, _: m(torch.zeros(4, 8)))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_data_names_the_quantizer(bad):
    model = Mlp()
    x = torch.randn(4, 8)
    sim = QuantizationSimModel(model, x, QuantConfig())
    poisoned = x.clone()
    poisoned[1, 2] = bad
    with pytest.raises(CalibrationError) as err:
        sim.compute_encodings(lambda m, _: m(poisoned))
    msg = str(err.value)
    assert "quantizer 'x'" in msg and "NaN or inf" in msg and "\n" not in msg, msg


def test_non_finite_weight_names_the_parameter():
    model = Mlp()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    x = torch.randn(4, 8)
    for scheme in ("min_max", "sqnr", "percentile"):
        sim = QuantizationSimModel(model, x, QuantConfig(param_quant_scheme=scheme))
        with pytest.raises(CalibrationError, match="quantizer 'fc1.weight'.*NaN or inf"):
            sim.compute_encodings(lambda m, _: m(x))
