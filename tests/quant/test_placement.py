"""Where quantizers go: inputs, every compute op (modules and functional ops, by module and
occurrence), supergroups, BN folding, mask paths, attention internals; models fx could not trace
(data-dependent control flow, ``*args/**kwargs``); ``leaf_modules``; what ``summary()`` says."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import run_batches
from tiny_torch_models import Mixed1d, Residual, randomize_batchnorms
from torch import nn

from orchestrator.quant import QuantConfig, QuantConfigError, QuantizationSimModel, QuantizeDequantize


def names(sim):
    return list(sim.activation_quantizers())


def test_placement_with_modules_functional_ops_and_supergroups():
    sim = QuantizationSimModel(Mixed1d(), torch.randn(4, 2, 16), QuantConfig())
    assert names(sim) == [
        "x",  # model input
        "act_a",  # conv_a -> bn_a (folded) -> relu6: one quantizer, after the group
        "relu_0",  # conv_b -> F.relu (the first relu functional op of the root's forward)
        "conv_c",  # conv followed by GELU: not a supergroup
        "gelu", "silu", "cat_0", "pool",
        "act_fc",  # fc1 -> relu
        "fc2",  # model output
    ]
    # no quantizer for max pooling, flatten, dropout; conv/linear weights quantized
    assert list(sim.param_quantizers()) == ["conv_a.weight", "conv_b.weight", "conv_c.weight", "fc1.weight",
                                            "fc2.weight"]
    assert [p.batchnorm for p in sim.folded] == ["bn_a"] and isinstance(sim.model.bn_a, nn.Identity)
    floats = sim.summary().split("Stays float:")[1]
    for line in ("conv_a: supergroup with the ReLU-like act_a", "conv_b: supergroup with the ReLU-like relu_0",
                 "fc1: supergroup with the ReLU-like act_fc", "output(s) of data movement"):
        assert line in floats, floats


def test_residual_adds_and_tensor_methods_are_quantized():
    sim = QuantizationSimModel(Residual(), torch.randn(2, 3, 6, 6), QuantConfig())
    # conv2 -> bn2 is folded, so the tensor feeding the residual add is conv2's output
    assert names(sim) == ["x", "relu_0", "conv2", "add_0", "relu_1", "mean_0", "mul_0", "mean_1", "add_2", "fc"]
    assert "add_1: supergroup with the ReLU-like relu_1" in sim.summary()  # add -> relu


def test_unfolded_batchnorm_is_a_supergroup_member():
    sim = QuantizationSimModel(Residual(), torch.randn(2, 3, 6, 6), QuantConfig(fold_batchnorm=False))
    assert "conv2" not in names(sim) and "bn2" in names(sim)
    assert not sim.folded and isinstance(sim.model.bn2, nn.BatchNorm2d)
    assert "conv2: supergroup with the BatchNorm bn2" in sim.summary()


@pytest.mark.parametrize("model_cls,shape", [(Mixed1d, (4, 2, 16)), (Residual, (2, 3, 6, 6))])
def test_batchnorm_folding_preserves_the_float_function(model_cls, shape):
    torch.manual_seed(0)
    model = randomize_batchnorms(model_cls()).eval()
    x = torch.randn(*shape)
    sim = QuantizationSimModel(model, x, QuantConfig())
    assert sim.folded
    sim.set_quantization_enabled(False)
    with torch.no_grad():
        assert torch.allclose(sim.model.eval()(x), model(x), atol=1e-5)


def test_caller_model_is_not_modified(pretrained, calibration_batches):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    cls = type(pretrained)
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    sim.compute_encodings(run_batches, calibration_batches)
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in before.items())
    assert type(pretrained) is cls and isinstance(pretrained.bn1, nn.BatchNorm2d)
    assert type(pretrained.conv1) is nn.Conv2d and not hasattr(pretrained, "input_quantizers")
    assert isinstance(sim.model, cls) and type(sim.model) is not cls


def logged(fn):
    """A ``*args/**kwargs`` decorator, as Hugging Face wraps its forwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Untraceable(nn.Module):
    """What ``torch.fx`` cannot trace: data-dependent control flow, ``*args/**kwargs``, a loop over
    a tensor's values, a Python container output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    @logged
    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["x"]
        h = self.conv(x)
        if h.sum() > 0:  # data-dependent control flow
            h = h * 2
        else:
            h = torch.sigmoid(h)
        for _ in range(int(kwargs.get("repeat", torch.tensor(1)).item())):  # loop count from a tensor
            h = h + 1
        return {"logits": self.fc(h.flatten(1)), "features": h}


def test_data_dependent_control_flow_and_star_args_build_and_quantize_the_path_taken():
    torch.manual_seed(0)
    model = Untraceable()
    with torch.no_grad():
        model.conv.bias.fill_(5.0)  # the dummy input takes the `h * 2` branch
    x = torch.randn(2, 1, 8, 8)
    sim = QuantizationSimModel(model, {"x": x, "repeat": torch.tensor(2)}, QuantConfig())
    # (h.sum() feeds only the branch condition, yet gets a quantizer: it is an op output with a consumer)
    assert names(sim) == ["x", "conv", "sum_0", "mul_0", "add_0", "add_1", "fc"]
    assert list(sim.param_quantizers()) == ["conv.weight", "fc.weight"]
    sim.compute_encodings(lambda m, _: m(x=x, repeat=torch.tensor(2)))
    out = sim.model(x=x, repeat=torch.tensor(2))
    assert isinstance(out, dict) and list(out) == ["logits", "features"] and out["logits"].shape == (2, 3)


def test_star_args_forward_quantizes_its_input_however_it_is_called():
    """``forward(self, *args, **kwargs)`` captured with ``x=`` then called positionally (the same
    tensor): the input quantizer must run either way."""
    torch.manual_seed(0)
    model = Untraceable()
    x = torch.randn(2, 1, 8, 8) * 3
    sim = QuantizationSimModel(model, {"x": x}, QuantConfig())
    sim.compute_encodings(lambda m, _: m(x=x))
    calls = []
    sim.activation_quantizers()["x"].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        by_keyword = sim.model(x=x)["logits"]
        positional = sim.model(x)["logits"]
    assert len(calls) == 2, f"the input quantizer ran {len(calls)} time(s) for 2 calls"
    assert torch.equal(by_keyword, positional)


def test_leaf_module_runs_as_written_with_its_output_quantized():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.tanh(self.conv(x)) + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.block = Block()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(self.stem(x)).mean((2, 3)))

    model = Net().eval()
    x = torch.randn(4, 1, 6, 6)
    sim = QuantizationSimModel(model, x, QuantConfig(leaf_modules=("block",)))
    assert names(sim) == ["x", "stem", "block", "mean_0", "fc"]  # nothing inside the block
    assert list(sim.param_quantizers()) == ["stem.weight", "fc.weight"]
    assert type(sim.model.block.conv) is nn.Conv2d  # not swapped: runs as written
    sim.compute_encodings(lambda m, _: m(x))
    text = sim.summary()
    assert "block.conv.weight: inside a leaf module (run as written)" in text
    assert "block: leaf module, run as written (its weights and intermediate results float, its output quantized)" \
        in text
    # the block's output is its float computation on the quantized input, then quantized
    acts = sim.activation_quantizers()
    with torch.no_grad():
        stem_out = acts["stem"](sim.model.stem.float_forward(acts["x"](x)))
        expected = acts["block"](model.block(stem_out))
        seen = {}
        h = acts["block"].register_forward_hook(lambda m, i, o: seen.update(out=o))
        sim.model(x)
        h.remove()
    assert torch.equal(seen["out"], expected)


def test_unknown_leaf_module_name_is_rejected():
    with pytest.raises(QuantConfigError, match=r"leaf_modules names \['nope'\].*allowed: qualified names"):
        QuantizationSimModel(Residual(), torch.randn(2, 3, 6, 6), QuantConfig(leaf_modules=("nope",)))


class MaskedAttention(nn.Module):
    """Attention with an additive mask computed from integer ids (a mask path, not an activation)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, ids, mask):
        h = self.emb(ids)
        bias = (1.0 - mask[:, None, :].float()) * -10000.0  # mask path: from integers and constants
        scores = self.q(h) @ self.k(h).transpose(1, 2) + bias
        return torch.softmax(scores, dim=-1) @ h


def test_mask_paths_and_embedding_rows_get_no_quantizer():
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    sim = QuantizationSimModel(MaskedAttention(), (ids, mask), QuantConfig())
    assert names(sim) == ["q", "k", "matmul_0", "softmax_0", "matmul_1"]  # no input quantizer: ints
    text = sim.summary()
    assert "add_0: mask applied inside the softmax softmax_0" in text
    assert "emb.weight" in sim.param_quantizers() and "emb" not in names(sim)  # rows of a quantized table
    assert "3 output(s) on mask/constant paths, not activations (float, mul_0, sub_0)" in text


def test_multihead_attention_internals_are_quantized_op_by_op():
    from tiny_torch_models import make_mha

    model, batch = make_mha()
    sim = QuantizationSimModel(model, batch(4, 0), QuantConfig())
    got = [n for n in names(sim) if n.startswith("attn.")]
    assert got == ["attn.linear_0", "attn.linear_1", "attn.linear_2", "attn.matmul_0", "attn.mul_0",
                   "attn.softmax_0", "attn.matmul_1", "attn.linear_3"]
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(sim.param_quantizers())
    assert "attn.add_0: mask applied inside the softmax attn.softmax_0" in sim.summary()


def test_module_called_twice_shares_its_quantizer():
    """torchvision's BasicBlock calls one ``ReLU(inplace=True)`` twice: one quantizer, both calls."""
    from tiny_torch_models import BasicBlock

    block = randomize_batchnorms(BasicBlock(4, 4)).eval()
    x = torch.randn(2, 4, 6, 6)
    sim = QuantizationSimModel(block, x, QuantConfig())
    assert names(sim) == ["x", "relu", "conv2"]
    sim.compute_encodings(lambda m, _: m(x))
    calls = []
    sim.activation_quantizers()["relu"].register_forward_hook(lambda *a: calls.append(1))
    sim.model(x)
    assert len(calls) == 2


def test_sequential_model_builds_and_runs():
    """``nn.Sequential`` is a common way to write a whole model; its forward runs its children."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(4, 1, 8, 8)
    sim = QuantizationSimModel(model, x, QuantConfig())
    sim.compute_encodings(lambda m, _: m(x))
    assert sim.model(x).shape == (4, 3)


def test_zero_padding_is_data_movement_like_zero_pad_modules():
    """Zero padding moves values (0 is on every grid): ``layers/elementwise.py`` declares
    ``nn.ZeroPad2d`` a pass-through module (``PASS_THROUGH_MODULES``, a tuple nothing reads), and
    ``F.pad`` is the same op; Hugging Face's MobileNetV2 calls it before every conv (``tf_padding``)."""

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(1, 4, 3)
            self.pad = nn.ZeroPad2d(1)
            self.conv_b = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv_b(F.pad(torch.tanh(self.conv_a(self.pad(x))), (1, 1, 1, 1)))

    sim = QuantizationSimModel(Padded(), torch.randn(2, 1, 6, 6), QuantConfig())
    assert names(sim) == ["x", "conv_a", "tanh_0", "conv_b"]


def test_summary_lists_every_quantizer_and_what_stays_float(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig(param_bw=4, output_bw=8))
    assert "not calibrated" in sim.summary()
    sim.compute_encodings(run_batches, calibration_batches)
    text = sim.summary()
    for name in list(sim.activation_quantizers()) + list(sim.param_quantizers()):
        assert f"\n  {name} " in text, name
    assert "W4A8" in text and "bn1 -> conv1" in text and "not calibrated" not in text
    floats = text.split("Stays float:")[1]
    assert "parameter tensor(s) of fewer than 2 dims" in floats
    assert "add_0: supergroup with the ReLU-like relu3" in floats


def test_quantizers_are_one_class_with_names(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    for name, q in {**sim.activation_quantizers(), **sim.param_quantizers()}.items():
        assert type(q) is QuantizeDequantize and q.name == name
    assert sim.param_quantizers()["conv2.weight"] is sim.model.conv2.param_quantizers["weight"]
    assert sim.activation_quantizers()["x"] is sim.model.input_quantizers["x"]
