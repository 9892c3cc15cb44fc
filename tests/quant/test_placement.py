"""Where quantizers go: inputs, every compute op (modules and functional ops), supergroups, BN folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_batches
from torch import nn

from orchestrator.quant import QuantConfig, QuantizationSimModel, UntraceableModelError


class Mixed1d(nn.Module):
    """Conv1d, BN, ReLU6, functional relu, GELU, SiLU, cat, avg pooling, max pooling, Linear->ReLU."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv1d(2, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm1d(8)
        self.act_a = nn.ReLU6()
        self.conv_b = nn.Conv1d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv1d(8, 8, 1)
        self.gelu = nn.GELU()
        self.silu = nn.SiLU()
        self.pool = nn.AvgPool1d(2)
        self.maxpool = nn.MaxPool1d(2)
        self.fc1 = nn.Linear(16 * 4, 32)
        self.act_fc = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        a = self.act_a(self.bn_a(self.conv_a(x)))
        b = F.relu(self.conv_b(a))
        c = self.silu(self.gelu(self.conv_c(a)))
        y = torch.cat([b, c], dim=1)
        y = self.maxpool(self.pool(y))
        y = y.flatten(1)
        y = self.drop(self.act_fc(self.fc1(y)))
        return self.fc2(y)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        y = self.bn2(self.conv2(h))
        s = h + y          # used twice below: its own quantizer
        r = (s + h).relu()  # add -> relu: one quantizer, after the relu
        m = r.mean(dim=(2, 3))
        return self.fc(m * 0.5 + s.mean(dim=(2, 3)))


def names(sim):
    return set(sim.activation_quantizers())


def test_placement_with_modules_functional_ops_and_supergroups():
    sim = QuantizationSimModel(Mixed1d(), torch.randn(4, 2, 16), QuantConfig())
    assert names(sim) == {
        "x",          # model input
        "act_a",      # conv_a -> bn_a (folded) -> relu6: one quantizer, after the group
        "relu",       # conv_b -> F.relu
        "conv_c",     # conv followed by GELU: not a supergroup
        "gelu", "silu", "cat", "pool",
        "act_fc",     # fc1 -> relu
        "fc2",        # model output
    }
    # no quantizer for max pooling, flatten, dropout; conv/linear weights quantized
    assert set(sim.weight_layers()) == {"conv_a", "conv_b", "conv_c", "fc1", "fc2"}
    assert [p.batchnorm for p in sim.folded] == ["bn_a"]


def test_residual_adds_and_methods_are_quantized():
    sim = QuantizationSimModel(Residual(), torch.randn(2, 3, 6, 6), QuantConfig())
    got = names(sim)
    # conv2 -> bn2 is folded, so the tensor feeding the residual add is conv2's output
    assert {"x", "relu", "conv2", "add", "relu_1", "mean", "mul", "mean_1", "add_2", "fc"} == got
    assert "add_1" not in got  # add -> relu supergroup


def test_unfolded_batchnorm_is_a_supergroup_member():
    sim = QuantizationSimModel(Residual(), torch.randn(2, 3, 6, 6), QuantConfig(fold_batchnorm=False))
    assert "conv2" not in names(sim) and "bn2" in names(sim)
    assert not sim.folded and isinstance(sim.model.bn2, nn.BatchNorm2d)


@pytest.mark.parametrize("model_cls,shape", [(Mixed1d, (4, 2, 16)), (Residual, (2, 3, 6, 6))])
def test_batchnorm_folding_preserves_the_float_function(model_cls, shape):
    torch.manual_seed(0)
    model = model_cls()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(*shape)
    sim = QuantizationSimModel(model, x, QuantConfig())
    assert sim.folded
    sim.set_quantization_enabled(False)
    sim.model.eval()
    assert torch.allclose(sim.model(x), model(x), atol=1e-5)


def test_caller_model_is_not_modified(pretrained, calibration_batches):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    sim.compute_encodings(run_batches, calibration_batches)
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in before.items())
    assert isinstance(pretrained.bn1, nn.BatchNorm2d)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return x * 2
        return x


class WithBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.branchy = Branchy()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.branchy(self.conv(x)).flatten(1))


def test_untraceable_model_error_names_the_op_and_the_way_out():
    with pytest.raises(UntraceableModelError) as err:
        QuantizationSimModel(WithBranch(), torch.randn(2, 1, 8, 8), QuantConfig())
    msg = str(err.value)
    assert "branchy" in msg and "if x.sum() > 0" in msg and "test_placement.py" in msg
    assert "leaf_modules=['branchy']" in msg


def test_leaf_module_fallback_quantizes_its_output_and_lists_it(calibration_batches):
    model = WithBranch()
    sim = QuantizationSimModel(model, torch.randn(2, 1, 8, 8), QuantConfig(leaf_modules=("branchy",)))
    assert "branchy" in names(sim)
    assert "branchy" in sim.summary().split("Not quantized:")[1]
    sim.compute_encodings(run_batches, [torch.randn(4, 1, 8, 8)])
    assert sim.model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_unknown_leaf_module_name_is_rejected():
    with pytest.raises(UntraceableModelError, match="nope"):
        QuantizationSimModel(WithBranch(), torch.randn(2, 1, 8, 8), QuantConfig(leaf_modules=("nope",)))


def test_summary_lists_every_quantizer(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(param_bw=4, output_bw=8))
    text = sim.summary()
    assert "not calibrated" in text
    sim.compute_encodings(run_batches, calibration_batches)
    text = sim.summary()
    for name in list(sim.activation_quantizers()) + [f"{n}.weight" for n in sim.weight_layers()]:
        assert name in text
    assert "W4A8" in text and "bn1 -> conv1" in text and "not calibrated" not in text
