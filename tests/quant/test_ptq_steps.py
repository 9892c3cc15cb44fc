"""PTQ steps before QAT (orchestrator/quant/ptq): CLE keeps the float function and equalises
ranges; AdaRound's weights sit on their grid (in both QAT modes) and reconstruct a layer better
than nearest rounding; SeqMSE finds the output-optimal clipping of a planted case."""

from __future__ import annotations

import pytest
import torch
from helpers import fragile_mlp
from torch import nn

from orchestrator.quant import QuantConfig, QuantizationSimModel
from orchestrator.quant.ptq import AdaRoundParams, SeqMseParams, adaround, equalize, find_pairs, seqmse
from orchestrator.quant.ptq.adaround import reconstruction_error
from orchestrator.quant.ptq.grid import current_encoding, grid_integers, nearest
from orchestrator.quant.ptq.layers import collect, quantization_off, target_layers
from orchestrator.zoo.models import Mnist1dCNN


def run(model, batch):
    return model(batch)


def calibrate(sim, batches):
    sim.compute_encodings(lambda m, bs: [m(b) for b in bs], batches)


@torch.no_grad()
def float_outputs(sim, batches):
    with quantization_off(sim):
        return [sim.model(b) for b in batches]


def unbalanced_cnn() -> nn.Module:
    """MNIST-1D's CNN (width 8) with channel ranges spread over 100x between layers (a function-
    preserving rescaling through the ReLUs), and one channel of conv3 always strongly positive."""
    torch.manual_seed(0)
    model = Mnist1dCNN(width=8).eval()
    with torch.no_grad():
        for a, b in ((model.conv1, model.conv2), (model.conv2, model.conv3)):
            f = torch.logspace(-1, 1, a.out_channels)[torch.randperm(a.out_channels)]
            a.weight.mul_(f[:, None, None])
            a.bias.mul_(f)
            b.weight.div_(f[None, :, None])
        model.conv3.bias[0] += 5.0
    return model


def data(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 1, 40, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------- CLE
def test_cle_finds_the_chain_through_relu_and_flatten():
    sim = QuantizationSimModel(unbalanced_cnn(), data(1)[0][:2], QuantConfig(param_bw=4, output_bw=8))
    pairs = [(p.first, p.second, p.activation, p.group) for p in find_pairs(sim)]
    assert pairs == [("conv1", "conv2", "relu", 1), ("conv2", "conv3", "relu", 1), ("conv3", "fc", "relu", 5)]


@pytest.mark.parametrize("with_data", [False, True], ids=["equalize", "equalize+absorb"])
def test_cle_keeps_float_outputs_and_equalises_ranges(with_data):
    batches = data()
    sim = QuantizationSimModel(unbalanced_cnn(), batches[0][:2], QuantConfig(param_bw=4, output_bw=8))
    before = float_outputs(sim, batches)
    ratio_before = _range_spread(sim)
    info = equalize(sim, run, batches) if with_data else equalize(sim)
    after = float_outputs(sim, batches)
    for x, y in zip(before, after):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    m = sim.model
    for pair in find_pairs(sim):
        a, b = m.get_submodule(pair.first).weight, m.get_submodule(pair.second).weight
        r1 = a.abs().reshape(a.shape[0], -1).amax(1)
        r2 = b.abs().transpose(0, 1).reshape(b.shape[1], -1).amax(1).reshape(-1, pair.group).amax(1)
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-6)
    assert ratio_before > 50 and _range_spread(sim) < ratio_before / 5
    if with_data:
        assert info["absorbed"] > 0
        with quantization_off(sim), torch.no_grad():  # conv3's channel 0 was always positive: now it touches 0
            z = torch.cat([sim.model.conv3(sim.model.relu2(sim.model.conv2(sim.model.relu1(sim.model.conv1(b)))))
                           for b in batches])
        assert abs(float(z[:, 0].min())) < 1e-4 and float(z.amin(dim=(0, 2)).max()) < 1e-4
        calibrate(sim, batches)
        assert sim.calibrated


def _range_spread(sim) -> float:
    w = sim.model.conv2.weight.detach().abs().reshape(sim.model.conv2.weight.shape[0], -1).amax(1)
    return float(w.max() / w.min())


# ---------------------------------------------------------------------------- AdaRound
def two_layer_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def mlp_data(n: int = 4) -> list[torch.Tensor]:
    """Correlated inputs (6 factors mixed into 16 features, plus a little noise): rounding errors
    of different weights can cancel, which is what AdaRound exploits (with white inputs nearest
    rounding is already optimal for a linear layer)."""
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(6, 16, generator=g)
    return [torch.randn(64, 6, generator=g) @ mix + 0.1 * torch.randn(64, 16, generator=g) for _ in range(n)]


@pytest.mark.parametrize("range_learning, quantized_inputs, block", [
    (False, True, 0), (True, True, 0), (False, False, 0), (False, True, 8), (True, True, 8)],
    ids=["static", "range_learning", "static-float-inputs", "static-blocks", "range_learning-blocks"])
def test_adaround_weights_on_grid_and_better_than_nearest(range_learning, quantized_inputs, block):
    """Per channel and per block (int3 in blocks of 8 along the input dim: the grid of each block)."""
    batches = mlp_data()
    cfg = QuantConfig(param_bw=3, output_bw=16, range_learning=range_learning,
                      learn_weight_encodings=range_learning, param_block_size=block)
    sim = QuantizationSimModel(two_layer_mlp(), batches[0][:2], cfg)
    calibrate(sim, batches)
    layers = target_layers(sim)
    assert [(l.name, l.activation) for l in layers] == [("0", "relu"), ("2", None)]
    with quantization_off(sim):
        targets = collect(sim, layers, run, batches, inputs=False, outputs=True)
    first = layers[0]
    x = collect(sim, [first], run, batches)[first.name]["input"]
    y = first.activate(targets[first.name]["output"])
    enc = current_encoding(first.entry)
    with torch.no_grad():
        nearest_err = float(reconstruction_error(first, x, nearest(first.entry.param.detach(), enc), y))
    done = adaround(sim, run, batches, AdaRoundParams(iterations=400, batch_size=64, lr=1e-2,
                                                      quantized_inputs=quantized_inputs))
    assert done == ["0", "2"]
    for layer in layers:
        w = layer.entry.param.detach()
        q = layer.entry.quantizer
        enc_after = q.encoding(w)
        ints = grid_integers(w, enc_after)
        torch.testing.assert_close(ints, ints.round(), rtol=0, atol=1e-4)  # on the grid ...
        assert float(ints.min()) > -1e-4 and float(ints.max()) < 2**3 - 1 + 1e-4
        with torch.no_grad():  # ... and the quantizer that QAT runs leaves it there
            torch.testing.assert_close(q(w), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(current_encoding(first.entry).scale, enc.scale, rtol=1e-6, atol=0)
    with torch.no_grad():
        ada_err = float(reconstruction_error(first, x, first.entry.param.detach(), y))
    assert ada_err < 0.8 * nearest_err
    sim.model.train()
    out = sim.model(batches[0])  # QAT goes on from here
    out.square().mean().backward()
    assert first.entry.param.grad is not None


# ---------------------------------------------------------------------------- SeqMSE
def test_seqmse_finds_the_output_optimal_clipping():
    """Channel 0 holds an outlier weight (10) on an input that is always 0: only the other weights
    matter, and they lie exactly on the 4-bit grid of clipping ratio 0.1 (scale 1/7). Min-max (and
    a clipping search on the weights themselves) keeps the outlier; SeqMSE must pick 0.1."""
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight[0] = torch.tensor([10.0, 7, -7, 3, -2, 5, 0, 6]) / torch.tensor([1.0] + [7.0] * 7)
        layer.weight[1] = torch.linspace(-1, 1, 8)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 8, generator=g) * torch.tensor([0.0] + [1.0] * 7) for _ in range(2)]
    sim = QuantizationSimModel(nn.Sequential(layer), batches[0][:2],
                               QuantConfig(param_bw=4, output_bw=16, param_quant_scheme="sqnr"))
    calibrate(sim, batches)
    entry = sim.quantized_params()["0.weight"]
    assert float(current_encoding(entry).scale[0]) > 0.3 * 10 / 7  # the weight-error search keeps the outlier
    chosen = seqmse(sim, run, batches, SeqMseParams(candidates=20))
    assert float(chosen["0"][0]) == pytest.approx(0.1)
    torch.testing.assert_close(current_encoding(entry).scale[0], torch.tensor(1 / 7), rtol=1e-5, atol=0)
    with torch.no_grad():
        out = sim.model(batches[0])
    torch.testing.assert_close(out[:, 0], layer(batches[0])[:, 0], rtol=0, atol=1e-3)  # 16-bit output steps


@pytest.mark.parametrize("range_learning", [False, True], ids=["follow", "learned"])
def test_seqmse_on_per_block_weights_lowers_the_layer_error_and_keeps_the_blocks(range_learning):
    batches = mlp_data()
    sim = QuantizationSimModel(two_layer_mlp(), batches[0][:2],
                               QuantConfig(param_bw=3, output_bw=16, param_block_size=8,
                                           range_learning=range_learning, learn_weight_encodings=range_learning))
    calibrate(sim, batches)
    first = target_layers(sim)[0]
    with quantization_off(sim):
        y = first.activate(collect(sim, [first], run, batches, inputs=False, outputs=True)["0"]["output"])
    x = collect(sim, [first], run, batches)["0"]["input"]
    before = current_encoding(first.entry)
    assert tuple(before.scale.shape) == (32, 2)  # a scale per (output channel, block of 8 inputs)

    def layer_error() -> float:
        with torch.no_grad():
            return float(reconstruction_error(first, x, first.entry.quantizer(first.entry.values()), y))

    err_before = layer_error()
    chosen = seqmse(sim, run, batches, SeqMseParams(candidates=10))
    after = current_encoding(first.entry)
    assert chosen["0"].shape == (32,) and tuple(after.scale.shape) == (32, 2)
    # each channel's blocks were clipped by that channel's ratio: their scales shrank by it
    ratio = after.scale / before.scale
    torch.testing.assert_close(ratio, chosen["0"][:, None].expand(32, 2).float(), rtol=1e-4, atol=0)
    assert layer_error() <= err_before


@pytest.mark.parametrize("cfg", [dict(param_format="float8_e4m3fn"), dict(param_format="nvfp4"),
                                 dict(param_format="lpbq", param_bw=4, param_block_size=8)],
                         ids=["fp8", "nvfp4", "lpbq"])
@pytest.mark.parametrize("step", ["adaround", "seqmse"])
def test_weights_without_a_free_integer_grid_are_refused_in_one_line(cfg, step):
    from orchestrator.quant import QuantConfigError

    batches = mlp_data()
    sim = QuantizationSimModel(two_layer_mlp(), batches[0][:2], QuantConfig(output_bw=16, **cfg))
    calibrate(sim, batches)
    with pytest.raises(QuantConfigError, match=f"{step}: the weight of layer '0' is quantized as .* allowed: int "
                                               "weights per tensor, per channel or per block") as info:
        (adaround if step == "adaround" else seqmse)(sim, run, batches)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- BN re-estimation
def conv_bn_model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()


def shifted(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(32, 3, 8, 8, generator=g) * 2.0 + 3.0 for _ in range(n)]


@pytest.mark.parametrize("range_learning", [False, True], ids=["static", "range_learning"])
def test_bn_reestimation_recovers_shifted_statistics_and_folds(range_learning):
    from orchestrator.quant.ptq.bn_reestimate import fold, reestimate

    batches = shifted()
    cfg = QuantConfig(param_bw=16, output_bw=16, fold_batchnorm=False, range_learning=range_learning,
                      learn_weight_encodings=range_learning)
    sim = QuantizationSimModel(conv_bn_model(), batches[0][:2], cfg)
    calibrate(sim, batches)
    bn = sim.model[1]
    assert torch.allclose(bn.running_mean, torch.zeros(8))  # fresh statistics: wrong for this data
    assert reestimate(sim, run, batches) == ["1"]
    with torch.no_grad(), quantization_off(sim):
        z = [sim.model[0](b) for b in batches]
    mean = torch.stack([t.mean(dim=(0, 2, 3)) for t in z]).mean(0)
    var = torch.stack([t.transpose(0, 1).reshape(8, -1).var(dim=1) for t in z]).mean(0)  # BN's cumulative average
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-3, atol=1e-3)
    assert float(mean.abs().max()) > 0.5  # the shift was there to recover
    with torch.no_grad():
        before = [sim.model(b) for b in batches]
    scale_before = sim.param_quantizers()["0.weight"].encoding(sim.model[0].weight).scale
    factor = (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach()
    assert fold(sim) == [("0", "1")]
    torch.testing.assert_close(bn.running_mean, torch.zeros(8))
    scale_after = sim.param_quantizers()["0.weight"].encoding(sim.model[0].weight).scale
    torch.testing.assert_close(scale_after, scale_before * factor.abs(), rtol=1e-4, atol=0)
    with torch.no_grad():
        for b, y in zip(batches, before):
            torch.testing.assert_close(sim.model(b), y, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------- sensitivity, mixed precision
def test_sensitivity_ranks_the_planted_fragile_layer_first_and_mixed_precision_meets_its_budget(tmp_path):
    import json

    from orchestrator.quant.ptq.sensitivity import (mixed_precision_overrides, quantized_sqnr, render, sensitivity,
                                                   weight_bits)

    batches = mlp_data(2)
    cfg = QuantConfig(param_bw=4, output_bw=16)
    sim = QuantizationSimModel(fragile_mlp(), batches[0][:2], cfg)
    calibrate(sim, batches)
    rows = sensitivity(sim, run, batches)
    assert rows[0].name == "2.weight" and rows[0].kind == "weight"
    assert rows[0].all_but == max(r.all_but for r in rows)  # turning it off helps the most, too
    assert {r.name for r in rows} >= {"0.weight", "2.weight", "4.weight", "input"}
    assert all(q.enabled for q in sim.param_quantizers().values())  # flags restored
    # a metric where lower is better (mode="min"): the noise in dB ranks the same way, reversed sign
    by_noise = sensitivity(sim, run, batches, metric=lambda: -quantized_sqnr(sim, run, batches), mode="min")
    assert [r.name for r in by_noise] == [r.name for r in rows]
    assert by_noise[0].only_on == pytest.approx(-rows[0].only_on)
    assert abs(quantized_sqnr(sim, run, batches) - rows[0].only_on) < 1  # all on: the fragile layer's noise
    with quantization_off(sim):
        assert quantized_sqnr(sim, run, batches) == float("inf")
    with pytest.raises(ValueError, match=r"mode='lower' is not allowed; allowed: max, min"):
        sensitivity(sim, run, batches, mode="lower")
    table = render(rows, 2).splitlines()
    assert len(table) == 3 and table[1].startswith("2.weight") and "weight" in table[1]
    numel = {"0.weight": 512, "2.weight": 1024, "4.weight": 256}
    budget = 4 + 4 * 1024 / 1792  # exactly the fragile layer at 8 bits
    overrides = mixed_precision_overrides(rows, high=8, budget=budget)
    assert overrides == {"2.weight": {"bitwidth": 8}} and weight_bits(rows, overrides) == budget
    assert mixed_precision_overrides(rows, high=8, keep_top_k=1) == {"2.weight": {"bitwidth": 8}}
    mixed = QuantizationSimModel(fragile_mlp(), batches[0][:2], QuantConfig(param_bw=4, output_bw=16,
                                                                             overrides=overrides))
    calibrate(mixed, batches)
    bits = {n: q.bitwidth for n, q in mixed.param_quantizers().items()}
    assert sum(numel[n] * b for n, b in bits.items()) / sum(numel.values()) == budget
    paths = mixed.export(str(tmp_path), "mixed")
    doc = json.loads(open(paths["encodings"]).read())
    recorded = {e["name"]: e["bw"] for e in doc["param_encodings"]}
    assert recorded == {"0.weight": 4, "2.weight": 8, "4.weight": 4}
    with pytest.raises(ValueError, match=r"budget=3.5 is below the weights. average bit width without raises \(4\)"):
        mixed_precision_overrides(rows, high=8, budget=4.0 - 0.5)
