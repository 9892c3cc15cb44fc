"""QAT without range learning (fixed activation encodings, weight encodings following the weights)
and with it (LSQ/LSQ+ on log-parametrised scales): what trains, what stays, hostile learning rates,
collapse warnings, and the state_dict round trip."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_batches, train_epochs
from numerics_reference import numpy_qdq
from torch import nn

from orchestrator.quant import EncodingCollapseWarning, QuantConfig, QuantConfigError, QuantizationSimModel
from orchestrator.quant.quantizer import FLOOR_RATIO


def calibrated_sim(model, batches, **cfg):
    sim = QuantizationSimModel(model, batches[0], QuantConfig(**cfg))
    sim.compute_encodings(run_batches, batches)
    return sim


def act_encodings(sim):
    return {n: (e.scale.clone(), e.offset.clone()) for n, e in sim.encodings()[0].items()}


def test_static_mode_keeps_activation_encodings_and_weight_encodings_follow_weights(
        pretrained, calibration_batches, digits_data):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4)
    calibrated = act_encodings(sim)
    assert sim.quantizer_parameters() == []
    assert not any(isinstance(b, nn.Parameter) for q in sim.activation_quantizers().values() for b in q.parameters())
    entry = sim.quantized_params()["conv2.weight"]
    opt = torch.optim.SGD(sim.model_parameters(), lr=0.05)
    x, y = digits_data.train.tensors
    sim.model.train()
    scales = []
    for step in range(5):
        batch = slice(64 * step, 64 * (step + 1))
        seen = {}
        hook = entry.quantizer.register_forward_hook(
            lambda m, inp, out: seen.update(w=inp[0].detach().clone(), out=out.detach().clone()))
        current = entry.param.detach().clone()
        opt.zero_grad()
        F.cross_entropy(sim.model(x[batch]), y[batch]).backward()
        opt.step()
        hook.remove()
        # the quantized weight used in this step was computed from this step's weights
        assert torch.equal(seen["w"], current)
        w = current.numpy().reshape(32, -1)
        scale = np.maximum(w.max(1) / np.float32(7), -w.min(1) / np.float32(8)).astype(np.float32)
        expected = numpy_qdq(current.numpy(), scale.reshape(32, 1, 1, 1), np.float32(-8), 4)
        np.testing.assert_array_equal(seen["out"].numpy(), expected)
        scales.append(scale)
    assert not np.array_equal(scales[0], scales[-1])  # weights moved, so did their encodings
    for name, (s, o) in act_encodings(sim).items():
        assert torch.equal(s, calibrated[name][0]) and torch.equal(o, calibrated[name][1]), name


def test_range_learning_trains_activation_scale_and_offset(pretrained, calibration_batches, digits_data):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4, range_learning=True)
    before = act_encodings(sim)
    qparams = sim.quantizer_parameters()
    assert len(qparams) == 2 * len(sim.activation_quantizers())  # log_scale and offset each
    assert {id(p) for p in qparams}.isdisjoint(id(p) for p in sim.model_parameters())
    assert len(qparams) + len(sim.model_parameters()) == len(list(sim.model.parameters()))
    raw_offsets = {n: q.offset.detach().clone() for n, q in sim.activation_quantizers().items()}
    train_epochs(sim.model, digits_data.train, epochs=1, lr=1e-3)
    after = act_encodings(sim)
    assert any(not torch.equal(before[n][0], after[n][0]) for n in before)
    # offsets are trained in integer units (the used offset is the rounded one): at Adam's lr 1e-3 an
    # epoch (28 steps) moves them by < 0.03, so the rounded offsets stay where calibration put them
    moved = [n for n, q in sim.activation_quantizers().items() if not torch.equal(q.offset.detach(), raw_offsets[n])]
    assert moved, "no offset parameter received a gradient step"
    assert all(float(o) == round(float(o)) for _, (_, o) in after.items())  # used offsets stay integers


def assert_encodings_valid(sim):
    acts, params = sim.encodings()
    for name, enc in acts.items():
        s, lo, hi = float(enc.scale), float(enc.min), float(enc.max)
        assert math.isfinite(s) and s > 0 and lo < hi and lo <= 0 <= hi, (name, enc)
    for name, enc in params.items():
        assert torch.isfinite(enc.scale).all() and torch.all(enc.scale > 0) and torch.all(enc.min < enc.max), name


def test_hostile_learning_rate_keeps_encodings_valid_and_warns(pretrained, calibration_batches, digits_data):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4, range_learning=True,
                         learn_weight_encodings=True)
    floors = {n: q.encoding().scale.clone() * FLOOR_RATIO for n, q in sim.activation_quantizers().items()}
    x, y = digits_data.train.tensors
    opt = torch.optim.SGD(sim.quantizer_parameters(), lr=1e6)
    sim.watch_encodings(opt)
    sim.model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EncodingCollapseWarning)
        for step in range(6):
            opt.zero_grad()
            out = sim.model(x[:128])
            assert torch.isfinite(out).all()
            # alternate a loss that drives scales up with one that drives them down hard
            loss = F.cross_entropy(out, y[:128]) * (1 if step % 2 else -1) + out.abs().sum() * (step % 3 == 2)
            loss.backward()
            opt.step()
            assert_encodings_valid(sim)
            for name, q in sim.activation_quantizers().items():
                assert float(q.encoding().scale) >= float(floors[name]) * (1 - 1e-5), name
    collapsed = sim.collapsed_quantizers()
    assert collapsed, "the hostile steps should have pushed some scale to its floor"
    messages = [str(w.message) for w in caught if issubclass(w.category, EncodingCollapseWarning)]
    assert sorted(m.split("'")[1] for m in messages) == sorted(set(m.split("'")[1] for m in messages))  # once each
    assert set(collapsed) <= {m.split("'")[1] for m in messages}
    assert all("encoding_lr" in m and "\n" not in m for m in messages)
    sim.model.eval()
    assert torch.isfinite(sim.model(x[:16])).all()


def test_default_trial_optimizer_does_not_collapse_digits(pretrained, calibration_batches, digits_data):
    """Adam at the trial's lr (1e-3) for weights and encodings: no scale reaches its floor."""
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4, range_learning=True,
                         learn_weight_encodings=True)
    opt = torch.optim.Adam([{"params": sim.model_parameters()}, {"params": sim.quantizer_parameters()}], lr=1e-3)
    sim.watch_encodings(opt)
    x, y = digits_data.train.tensors
    sim.model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EncodingCollapseWarning)
        for step in range(30):
            opt.zero_grad()
            F.cross_entropy(sim.model(x[64 * step:64 * step + 64]), y[64 * step:64 * step + 64]).backward()
            opt.step()
    assert sim.collapsed_quantizers() == []


def test_learned_weight_encodings_are_parameters_initialised_from_weights(pretrained, calibration_batches):
    with pytest.raises(QuantConfigError, match="range_learning"):
        QuantConfig(learn_weight_encodings=True)
    sim = calibrated_sim(pretrained, calibration_batches, range_learning=True, learn_weight_encodings=True)
    entry = sim.quantized_params()["conv2.weight"]
    assert isinstance(entry.quantizer.log_scale, nn.Parameter)
    w = entry.param.detach().reshape(32, -1)
    expected = torch.maximum(w.amax(1) / 127, -w.amin(1) / 128)
    assert torch.allclose(entry.quantizer.log_scale.detach().exp(), expected, rtol=1e-6)
    assert len(sim.quantizer_parameters()) == 2 * len(sim.activation_quantizers()) + len(sim.param_quantizers())


def test_switching_modes_is_one_field(pretrained, calibration_batches):
    static = calibrated_sim(copy.deepcopy(pretrained), calibration_batches, range_learning=False)
    learned = calibrated_sim(copy.deepcopy(pretrained), calibration_batches, range_learning=True)
    assert list(static.activation_quantizers()) == list(learned.activation_quantizers())
    x = calibration_batches[0]
    with torch.no_grad():
        a, b = static.model.eval()(x), learned.model.eval()(x)
    # same calibration; the learned scale is exp(log(s)): equal up to that float rounding
    assert (a.argmax(1) == b.argmax(1)).all() and torch.allclose(a, b, atol=2 * float(
        static.activation_quantizers()["fc"].encoding().scale))


def test_state_dict_keys_name_each_quantizer(pretrained, calibration_batches):
    sim = calibrated_sim(pretrained, calibration_batches, range_learning=True)
    keys = set(sim.model.state_dict())
    for key in ("conv2.param_quantizers.weight.ratio", "conv3.output_quantizers.0.log_scale",
                "conv3.output_quantizers.0.offset", "input_quantizers.x.log_scale", "fc.weight"):
        assert key in keys, sorted(k for k in keys if "quantizers" in k)


@pytest.mark.parametrize("range_learning", [False, True])
def test_state_dict_restores_exact_encodings(pretrained, calibration_batches, digits_data, range_learning):
    cfg = dict(param_bw=4, output_bw=4, range_learning=range_learning, learn_weight_encodings=range_learning)
    sim = calibrated_sim(pretrained, calibration_batches, **cfg)
    train_epochs(sim.model, digits_data.train, epochs=1, lr=1e-3)
    state = copy.deepcopy(sim.model.state_dict())
    fresh = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(**cfg))
    assert not fresh.calibrated
    fresh.model.load_state_dict(state)
    assert fresh.calibrated
    (a_acts, a_params), (b_acts, b_params) = fresh.encodings(), sim.encodings()
    assert list(a_acts) == list(b_acts) and list(a_params) == list(b_params)
    for name in b_acts:
        assert torch.equal(a_acts[name].scale, b_acts[name].scale) and torch.equal(a_acts[name].offset,
                                                                                   b_acts[name].offset), name
    for name in b_params:
        assert torch.equal(a_params[name].scale, b_params[name].scale), name
    x = digits_data.test.tensors[0]
    with torch.no_grad():
        assert torch.equal(fresh.model.eval()(x), sim.model.eval()(x))


@pytest.mark.parametrize("cfg", [
    dict(quantize_activations=False, range_learning=True, learn_weight_encodings=True),  # weight-only, RL
    dict(range_learning=True, learn_weight_encodings=True, overrides={"2": {"enabled": False},
                                                                      "2.weight": {"enabled": False}}),
], ids=["weight-only", "override-off"])
def test_quantizers_the_config_turns_off_hold_no_trainable_parameter(cfg):
    """Every trainable parameter of ``sim.model`` gets a gradient (DistributedDataParallel refuses
    parameters no loss reaches); turning quantization off and on again restores the config's choice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 6)
    sim = QuantizationSimModel(model, x, QuantConfig(**cfg))
    sim.compute_encodings(lambda m, _: m(x))
    sim.model(x).square().sum().backward()
    trainable = [n for n, p in sim.model.named_parameters() if p.requires_grad]
    assert [n for n, p in sim.model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert any("log_scale" in n for n in trainable)  # the enabled ones still learn
    before = {n: q.enabled for n, q in [*sim.activation_quantizers().items(), *sim.param_quantizers().items()]}
    assert not all(before.values())
    sim.set_quantization_enabled(False)
    sim.set_quantization_enabled(True)
    after = {n: q.enabled for n, q in [*sim.activation_quantizers().items(), *sim.param_quantizers().items()]}
    assert after == before
