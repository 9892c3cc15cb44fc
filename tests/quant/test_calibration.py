"""Calibration: the three schemes, eval mode without gradients, no weight changes."""

from __future__ import annotations

import pytest
import torch
from helpers import run_batches
from torch import nn

from orchestrator.quant import ActivationQuantizer, QuantConfig, QuantizationSimModel
from orchestrator.quant.calibration import HistogramObserver, PercentileObserver, SqnrObserver, bin_counts


def test_min_max_uses_observed_extremes(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(quant_scheme="min_max"))
    sim.compute_encodings(run_batches, calibration_batches)
    x = torch.cat(calibration_batches)
    enc = sim.activation_quantizers()["x"].encoding()
    # the input quantizer sees the raw pixels: range [min(x), max(x)] widened to hold 0
    assert float(enc.min) == 0.0
    assert abs(float(enc.max) - float(x.max())) <= float(enc.scale)


def test_percentile_of_a_known_distribution():
    obs = PercentileObserver(99.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # several batches, growing range, exercise re-binning
        obs.observe(torch.rand(50_000, generator=gen) * 10.0 - 2.0)
    obs.observe(torch.tensor([1000.0]))  # one outlier widens the histogram a lot
    lo, hi = obs.range(8)
    assert abs(lo - (-2.0 + 0.12)) < 0.3 and abs(hi - (8.0 - 0.1)) < 0.3
    full = PercentileObserver(100.0)  # p = 100 is min-max
    full.observe(torch.tensor([-1.0, 3.0]))
    assert full.range(8) == (-1.0, 3.0)


@pytest.mark.parametrize("lo, hi", [(0.0, 5.0), (-3.0, 7.5), (-1e-3, 2e-3)])
def test_bin_counts_match_histc(lo, hi):
    torch.manual_seed(0)
    values = torch.rand(200_000) * (hi - lo) + lo
    values[:3] = torch.tensor([lo, hi, (lo + hi) / 2])  # both ends and a bin edge
    counts = bin_counts(values, 2048, lo, hi)
    reference = torch.histc(values, 2048, lo, hi)
    assert counts.sum() == values.numel() and counts[0] >= 1 and counts[-1] >= 1
    # a value within a float32 rounding of a bin edge may land in the neighbouring bin: at most
    # 1 in 10^4 values moves (each move changes two counts by one)
    assert (counts.float() - reference).abs().sum() <= 2e-4 * values.numel()


def test_histogram_rebinning_keeps_counts():
    obs = HistogramObserver(bins=64)
    obs.observe(torch.linspace(0, 1, 1000))
    obs.observe(torch.linspace(-5, 7, 1000))
    assert abs(float(obs.hist.sum()) - 2000) < 1e-6
    assert obs.lo <= -5 and obs.hi >= 7


def test_sqnr_clips_outliers_and_beats_min_max_noise():
    gen = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(200_000, generator=gen).abs(), torch.tensor([60.0])])  # ReLU-like + outlier
    obs = SqnrObserver()
    obs.observe(data)
    lo, hi = obs.range(4)
    assert lo == 0.0 and 2.0 < hi < 20.0  # clips the single outlier at 60

    def mse(rmin, rmax):
        q = ActivationQuantizer("t", 4, learnable=False)
        q.set_range(rmin, rmax)
        return float(((q(data) - data) ** 2).mean())

    assert mse(lo, hi) < 0.5 * mse(0.0, 60.0)


@pytest.mark.parametrize("scheme", ["min_max", "sqnr", "percentile"])
def test_calibration_runs_in_eval_mode_without_grad_and_changes_no_weights(pretrained, calibration_batches, scheme):
    cfg = QuantConfig(quant_scheme=scheme, fold_batchnorm=False)  # keep BN: its running stats must not move
    sim = QuantizationSimModel(pretrained, calibration_batches[0], cfg)
    sim.model.train()
    before = {k: v.clone() for k, v in sim.model.state_dict().items() if "quantizer" not in k}
    seen = []

    def callback(model, batches):
        seen.append((model.training, torch.is_grad_enabled()))
        run_batches(model, batches)

    sim.compute_encodings(callback, calibration_batches)
    assert seen == [(False, False)]
    assert sim.model.training  # mode restored
    after = {k: v for k, v in sim.model.state_dict().items() if "quantizer" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sim.calibrated


def test_schemes_give_different_ranges_on_real_data(pretrained, calibration_batches):
    maxima = {}
    for scheme in ("min_max", "sqnr", "percentile"):
        sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(quant_scheme=scheme, output_bw=4))
        sim.compute_encodings(run_batches, calibration_batches)
        maxima[scheme] = float(sim.activation_quantizers()["relu4"].encoding().max)
    assert maxima["sqnr"] < maxima["min_max"]
    assert maxima["percentile"] <= maxima["min_max"]


def test_quantizer_never_reached_is_reported(calibration_batches):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 4)
            self.b = nn.Linear(64, 4)

        def forward(self, x):
            return self.a(x.flatten(1)) + self.b(x.flatten(1))

    sim = QuantizationSimModel(TwoHeads(), calibration_batches[0], QuantConfig())
    with pytest.raises(Exception, match="saw no data"):
        sim.compute_encodings(lambda m, _: None)
