"""Export: .pth / .onnx / .encodings per the contract (AIMET 1.0.0 and 0.6.1 layouts), and the
independent QDQ check in onnxruntime on the trained digits CNN and on functional-op models."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import run_batches, train_epochs
from quant_checks import calibrated
from tiny_torch_models import Mixed1d, Residual
from torch import nn

from orchestrator.quant import QdqRunner, QuantConfig, QuantizationSimModel
from orchestrator.zoo.models import DigitsCNN


def calibrated_sim(model, batches, **cfg):
    sim = QuantizationSimModel(model, batches[0], QuantConfig(**cfg))
    sim.compute_encodings(run_batches, batches)
    return sim


def onnx_tensors(path):
    g = onnx.load(path).graph
    return {i.name for i in g.input} | {o for n in g.node for o in n.output}, {i.name for i in g.initializer}, g


def test_export_writes_three_files_per_contract(pretrained, calibration_batches, tmp_path):
    sim = calibrated_sim(pretrained, calibration_batches)
    paths = sim.export(str(tmp_path), "digits", calibration_batches[0][:1])
    assert sorted(os.listdir(tmp_path)) == ["digits.encodings", "digits.onnx", "digits.pth"]
    assert paths == {k: str(tmp_path / f"digits.{k}") for k in ("pth", "onnx", "encodings")}

    state = torch.load(paths["pth"], weights_only=True)
    assert not any("quantizers" in k for k in state)
    original = DigitsCNN()
    original.load_state_dict(state)  # the original architecture, strict
    original.eval()

    tensors, initializers, graph = onnx_tensors(paths["onnx"])
    assert not {n.op_type for n in graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    assert [o.name for o in graph.output] == ["output"] and [i.name for i in graph.input] == ["x"]

    doc = json.loads(open(paths["encodings"]).read())
    assert doc["version"] == "1.0.0"
    assert set(doc) == {"version", "activation_encodings", "param_encodings", "excluded_layers", "quantizer_args"}
    acts, params = doc["activation_encodings"], doc["param_encodings"]
    # every activation quantizer, under its ONNX tensor name (the model input and output keep theirs)
    expected_acts = {sim.onnx_activation_name(n) for n in sim.activation_quantizers()}
    assert {e["name"] for e in acts} == expected_acts and {"x", "output"} <= expected_acts
    assert {e["name"] for e in params} == set(sim.param_quantizers())
    assert {e["name"] for e in acts} <= tensors and {e["name"] for e in params} <= initializers
    conv2 = next(e for e in params if e["name"] == "conv2.weight")
    assert conv2["enc_type"] == "PER_CHANNEL" and conv2["is_sym"] is True and len(conv2["scale"]) == 32
    assert conv2["axis"] == 0 and set(conv2["offset"]) == {-128} and "source" not in conv2
    assert all(e["enc_type"] == "PER_TENSOR" and e["is_sym"] is False and e["bw"] == 8 for e in acts)
    assert doc["quantizer_args"]["quant_scheme"] == "post_training_tf_enhanced"  # sqnr, the default
    enc = {e["name"]: e for e in acts}["relu1"]
    q = sim.activation_quantizers()["relu1"].encoding()
    assert enc["scale"] == [float(q.scale)] and enc["offset"] == [int(q.offset)]

    # .pth in the original class == the ONNX float graph == sim.model with quantization off
    x = calibration_batches[1]
    sim.set_quantization_enabled(False)
    with torch.no_grad():
        float_sim = sim.model.eval()(x)
        float_pth = original(x)
    float_onnx = ort.InferenceSession(paths["onnx"]).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(float_pth, float_sim, atol=1e-4)
    assert np.allclose(float_onnx, float_sim.numpy(), atol=1e-4)


def test_export_version_0_6_1(pretrained, calibration_batches, tmp_path):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4)
    paths = sim.export(str(tmp_path), "m", encoding_version="0.6.1")
    doc = json.loads(open(paths["encodings"]).read())
    assert doc["version"] == "0.6.1"
    assert isinstance(doc["activation_encodings"], dict) and isinstance(doc["param_encodings"], dict)
    conv1 = doc["param_encodings"]["conv1.weight"]
    assert len(conv1) == 32
    assert set(conv1[0]) == {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}
    assert conv1[0]["is_symmetric"] == "True" and conv1[0]["offset"] == -8 and conv1[0]["bitwidth"] == 4
    entry = doc["activation_encodings"]["relu1"][0]
    assert entry["is_symmetric"] == "False"
    assert entry["min"] == pytest.approx(entry["scale"] * entry["offset"])
    assert entry["max"] == pytest.approx(entry["scale"] * (entry["offset"] + 255))
    assert doc["quantizer_args"]["per_channel_quantization"] == "True"
    tensors, initializers, _ = onnx_tensors(paths["onnx"])
    assert set(doc["activation_encodings"]) <= tensors and set(doc["param_encodings"]) <= initializers
    sim.load_encodings(paths["encodings"])  # both layouts load back
    x = calibration_batches[0]
    with torch.no_grad():
        ours = sim.model.eval()(x).numpy()
    theirs = QdqRunner(paths["onnx"], paths["encodings"])(x.numpy())
    # the QDQ contract: equal but where a value sits on a rounding boundary and onnxruntime's
    # summation order moves it one step (sqnr's clipped grids have more boundaries)
    step = float(sim.activation_quantizers()["fc"].encoding().scale)
    assert np.abs(theirs - ours).max() <= step + 1e-6 and (theirs == ours).mean() >= 0.99


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    return float((ours.argmax(1) == theirs.argmax(1)).mean()), float((ours == theirs).mean())


@pytest.mark.parametrize("bits,range_learning", [(8, False), (4, False), (4, True), (3, True)])
def test_qdq_onnx_reproduces_sim_model_on_digits(pretrained, calibration_batches, digits_data, tmp_path,
                                                 bits, range_learning):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=bits, output_bw=bits,
                         range_learning=range_learning, learn_weight_encodings=range_learning)
    train_epochs(sim.model, digits_data.train, epochs=1, lr=1e-3)  # encodings and weights move
    paths = sim.export(str(tmp_path), "digits")
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    x, _ = digits_data.test.tensors
    with torch.no_grad():
        ours = sim.model.eval()(x).numpy()
    theirs = runner(x.numpy())
    top1, exact = agreement(ours, theirs)
    step = float(sim.activation_quantizers()["fc"].encoding().scale)
    # same contract on both sides: only float summation order differs (a value at a rounding
    # boundary may land one step apart)
    assert top1 == 1.0 and exact >= 0.99, (top1, exact)
    assert np.abs(ours - theirs).max() <= 2 * step + 1e-6


@pytest.mark.parametrize("model_cls,shape,bits", [(Mixed1d, (16, 2, 16), 8), (Residual, (16, 3, 6, 6), 3),
                                                  (Residual, (16, 3, 6, 6), 16)])
def test_qdq_onnx_covers_functional_ops_and_odd_bit_widths(model_cls, shape, bits, tmp_path):
    torch.manual_seed(0)
    model = model_cls().eval()
    batches = [torch.randn(*shape) for _ in range(4)]
    # min_max: at 16 bits the sqnr default clips fc to a ~1e-5 step, where float summation order
    # alone moves 10% of the outputs one step (still within the one-step contract asserted below)
    sim = calibrated_sim(model, batches, param_bw=bits, output_bw=bits, quant_scheme="min_max")
    paths = sim.export(str(tmp_path), "m")
    tensors, initializers, _ = onnx_tensors(paths["onnx"])
    doc = json.loads(open(paths["encodings"]).read())
    assert {e["name"] for e in doc["activation_encodings"]} <= tensors
    assert {e["name"] for e in doc["param_encodings"]} <= initializers
    assert all(e["bw"] == bits for e in doc["activation_encodings"] + doc["param_encodings"])
    x = torch.randn(*shape)
    with torch.no_grad():
        ours = sim.model.eval()(x).numpy()
    theirs = QdqRunner(paths["onnx"], paths["encodings"])(x.numpy())
    step = float(sim.activation_quantizers()["fc" if model_cls is Residual else "fc2"].encoding().scale)
    assert np.abs(ours - theirs).max() <= step + 1e-6 and (ours == theirs).mean() >= 0.95


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_model_input_encodings_are_exported(tmp_path):
    """The input quantizer's encoding is in the file under the graph input's name, so onnxruntime
    quantizes the input as ``sim.model`` does (without it: ViT 84% top-1 agreement)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4) * 3
    sim = calibrated(TwoLinear().eval(), [x])
    paths = sim.export(str(tmp_path), "m")
    doc = json.loads(open(paths["encodings"]).read())
    entry = {e["name"]: e for e in doc["activation_encodings"]}["x"]
    assert entry["scale"] == [float(sim.activation_quantizers()["x"].encoding().scale)]
    with torch.no_grad():
        ours = sim.model(x).numpy()
    assert np.array_equal(QdqRunner(paths["onnx"], paths["encodings"])(x.numpy()), ours)


class InplaceResidual(nn.Module):
    """torchvision's pattern: ``out = conv(x); out += identity; relu(out)`` (in-place add and ReLU)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        out = self.conv(x)
        out += x
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def test_in_place_ops_after_a_quantized_output_export(tmp_path):
    """The conv output is quantized (its consumer is the add, not a ReLU), then mutated in place."""
    torch.manual_seed(0)
    xs = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    sim = calibrated(InplaceResidual().eval(), xs)
    assert list(sim.activation_quantizers()) == ["x", "conv", "relu", "mean_0", "fc"]
    paths = sim.export(str(tmp_path), "m")
    with torch.no_grad():
        ours = sim.model(xs[0]).numpy()
    assert np.array_equal(QdqRunner(paths["onnx"], paths["encodings"])(xs[0].numpy()), ours)


class SamePadding(nn.Module):
    """Hugging Face's ``tf_padding``: ``F.pad`` before every conv, by zero for 1x1 kernels."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(3, 4, 3)
        self.conv1 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = torch.tanh(self.conv3(F.pad(x, (1, 1, 1, 1))))
        return self.conv1(F.pad(h, (0, 0, 0, 0)))


def test_zero_width_padding_exports(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    sim = calibrated(SamePadding().eval(), xs)
    paths = sim.export(str(tmp_path), "m")
    with torch.no_grad():
        ours = sim.model(xs[0]).numpy()
    assert np.array_equal(QdqRunner(paths["onnx"], paths["encodings"])(xs[0].numpy()), ours)
