"""QAT without range learning (static activation encodings) and with it (LSQ/LSQ+)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import run_batches, train_epochs
from torch import nn

from orchestrator.quant import QuantConfig, QuantizationSimModel
from orchestrator.quant.fake_quant import weight_scale


def calibrated_sim(model, batches, **cfg):
    sim = QuantizationSimModel(model, batches[0], QuantConfig(**cfg))
    sim.compute_encodings(run_batches, batches)
    return sim


def act_state(sim):
    return {n: (q.scale.detach().clone(), q.offset.detach().clone()) for n, q in sim.activation_quantizers().items()}


def test_static_mode_keeps_activation_encodings_and_weight_encodings_follow_weights(
        pretrained, calibration_batches, digits_data):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4)
    calibrated = act_state(sim)
    assert sim.quantizer_parameters() == []
    assert not any(isinstance(q.scale, nn.Parameter) for q in sim.activation_quantizers().values())
    layer = sim.model.conv2
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.05)
    x, y = digits_data.train.tensors
    sim.model.train()
    scales = []
    for step in range(5):
        batch = slice(64 * step, 64 * (step + 1))
        seen = {}
        hook = layer.weight_quantizer.register_forward_hook(
            lambda m, inp, out: seen.update(w=inp[0].detach().clone(), out=out.detach().clone()))
        opt.zero_grad()
        F.cross_entropy(sim.model(x[batch]), y[batch]).backward()
        opt.step()
        hook.remove()
        # the quantized weight used in this step was computed from this step's weights
        expected_scale = weight_scale(seen["w"], 4, True)
        zp = torch.full((expected_scale.numel(),), 8, dtype=torch.int32)
        assert torch.equal(seen["out"], torch.fake_quantize_per_channel_affine(seen["w"], expected_scale, zp, 0, 0, 15))
        scales.append(expected_scale)
    assert not torch.equal(scales[0], scales[-1])  # weights moved, so did their encodings
    for name, (s, o) in act_state(sim).items():
        assert torch.equal(s, calibrated[name][0]) and torch.equal(o, calibrated[name][1]), name


def test_range_learning_trains_activation_scale_and_offset(pretrained, calibration_batches, digits_data):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4, range_learning=True)
    before = act_state(sim)
    qparams = sim.quantizer_parameters()
    assert len(qparams) == 2 * len(sim.activation_quantizers())
    assert all(isinstance(p, nn.Parameter) for p in qparams)
    train_epochs(sim.model, digits_data.train, epochs=1, lr=1e-3)
    after = act_state(sim)
    assert any(not torch.equal(before[n][0], after[n][0]) for n in before)
    assert any(not torch.equal(before[n][1], after[n][1]) for n in before if float(before[n][1][0]) < 0)


def test_hostile_learning_rate_keeps_encodings_valid(pretrained, calibration_batches, digits_data):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4, range_learning=True,
                         learn_weight_encodings=True)
    x, y = digits_data.train.tensors
    opt = torch.optim.SGD(sim.quantizer_parameters(), lr=1e6)
    sim.model.train()
    went_negative = False
    for step in range(6):
        opt.zero_grad()
        out = sim.model(x[:128])
        assert torch.isfinite(out).all()
        # alternate a loss that drives scales up with one that drives them down hard
        loss = F.cross_entropy(out, y[:128]) * (1 if step % 2 else -1) + out.abs().sum() * (step % 3 == 2)
        loss.backward()
        opt.step()
        raw_scales = [q.scale for q in sim.activation_quantizers().values()] + [
            layer.weight_quantizer.scale for layer in sim.weight_layers().values()]
        went_negative |= any(float(s.detach().min()) <= 0 for s in raw_scales)
        for q in sim.activation_quantizers().values():
            enc = q.encoding()
            assert float(enc.scale) > 0 and float(enc.min) < float(enc.max) and float(enc.min) <= 0 <= float(enc.max)
        for name, layer in sim.weight_layers().items():
            enc = layer.weight_quantizer.encoding(layer.weight)
            assert torch.all(enc.scale > 0) and torch.all(enc.min < enc.max), name
    assert went_negative, "the hostile steps should have pushed some raw parameter through zero"
    assert torch.isfinite(sim.model(x[:16])).all()


def test_learned_weight_encodings_are_parameters_initialised_from_weights(pretrained, calibration_batches):
    with pytest.raises(ValueError, match="range_learning"):
        QuantConfig(learn_weight_encodings=True)
    sim = calibrated_sim(pretrained, calibration_batches, range_learning=True, learn_weight_encodings=True)
    wq = sim.model.conv2.weight_quantizer
    assert isinstance(wq.scale, nn.Parameter)
    assert torch.allclose(wq.scale.detach(), weight_scale(sim.model.conv2.weight, 8, True))


def test_switching_modes_is_one_field(pretrained, calibration_batches):
    static = calibrated_sim(copy.deepcopy(pretrained), calibration_batches, range_learning=False)
    learned = calibrated_sim(copy.deepcopy(pretrained), calibration_batches, range_learning=True)
    assert set(static.activation_quantizers()) == set(learned.activation_quantizers())
    x = calibration_batches[0]
    assert torch.equal(static.model.eval()(x), learned.model.eval()(x))  # same encodings, same output


@pytest.mark.parametrize("range_learning", [False, True])
def test_state_dict_restores_exact_encodings(pretrained, calibration_batches, digits_data, range_learning):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4, range_learning=range_learning)
    train_epochs(sim.model, digits_data.train, epochs=1, lr=1e-3)
    state = copy.deepcopy(sim.model.state_dict())
    assert any(k.startswith("activation_quantizers.") and k.endswith(".scale") for k in state)
    fresh = QuantizationSimModel(pretrained, calibration_batches[0],
                                 QuantConfig(param_bw=4, output_bw=4, range_learning=range_learning))
    assert not fresh.calibrated
    fresh.model.load_state_dict(state)
    assert fresh.calibrated
    for name, q in fresh.activation_quantizers().items():
        a, b = q.encoding(), sim.activation_quantizers()[name].encoding()
        assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)
    x = digits_data.test.tensors[0]
    assert torch.equal(fresh.model.eval()(x), sim.model.eval()(x))
