"""Export: .pth / .onnx / .encodings per the contract, and the independent QDQ check in onnxruntime."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import run_batches, train_epochs
from test_placement import Mixed1d, Residual

from orchestrator.quant import ExportError, QdqRunner, QuantConfig, QuantizationSimModel
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
    assert not any("quantizer" in k for k in state)
    original = DigitsCNN()
    original.load_state_dict(state)  # the original architecture, strict
    original.eval()

    tensors, initializers, graph = onnx_tensors(paths["onnx"])
    assert not {n.op_type for n in graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    assert [o.name for o in graph.output] == ["output"]

    doc = json.loads(open(paths["encodings"]).read())
    assert doc["version"] == "1.0.0"
    assert set(doc) == {"version", "activation_encodings", "param_encodings", "excluded_layers", "quantizer_args"}
    acts, params = doc["activation_encodings"], doc["param_encodings"]
    assert len(acts) == len(sim.activation_quantizers()) and len(params) == len(sim.weight_layers())
    assert {e["name"] for e in acts} <= tensors
    assert {e["name"] for e in params} <= initializers
    conv2 = next(e for e in params if e["name"] == "conv2.weight")
    assert conv2["enc_type"] == "PER_CHANNEL" and conv2["is_sym"] is True and len(conv2["scale"]) == 32
    assert set(conv2["offset"]) == {-128}
    assert all(e["enc_type"] == "PER_TENSOR" and e["is_sym"] is False and e["bw"] == 8 for e in acts)

    # .pth in the original class == the ONNX float graph == sim.model with quantization off
    x = calibration_batches[1]
    sim.set_quantization_enabled(False)
    float_sim = sim.model.eval()(x)
    float_pth = original(x)
    float_onnx = ort.InferenceSession(paths["onnx"]).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(float_pth, float_sim, atol=1e-4)
    assert np.allclose(float_onnx, float_sim.detach().numpy(), atol=1e-4)


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
    # both layouts load back
    sim.load_encodings(paths["encodings"])


@pytest.mark.parametrize("bits,range_learning", [(8, False), (4, False), (4, True), (3, True)])
def test_qdq_onnx_reproduces_sim_model_on_digits(pretrained, calibration_batches, digits_data, tmp_path,
                                                 bits, range_learning):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=bits, output_bw=bits,
                         range_learning=range_learning, learn_weight_encodings=range_learning)
    train_epochs(sim.model, digits_data.train, epochs=1, lr=1e-3)  # encodings and weights move
    paths = sim.export(str(tmp_path), "digits")
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    x, _ = digits_data.test.tensors
    ours = sim.model.eval()(x).detach().numpy()
    theirs = runner(x.numpy())
    agreement = (ours.argmax(1) == theirs.argmax(1)).mean()
    step = float(sim.activation_quantizers()["fc"].encoding().scale)
    assert agreement >= 0.99
    assert np.abs(ours - theirs).max() <= 3 * step + 1e-6


@pytest.mark.parametrize("model_cls,shape,bits", [(Mixed1d, (16, 2, 16), 8), (Residual, (16, 3, 6, 6), 3),
                                                  (Residual, (16, 3, 6, 6), 16)])
def test_qdq_onnx_covers_functional_ops_and_odd_bit_widths(model_cls, shape, bits, tmp_path):
    torch.manual_seed(0)
    model = model_cls().eval()
    batches = [torch.randn(*shape) for _ in range(4)]
    sim = calibrated_sim(model, batches, param_bw=bits, output_bw=bits)
    paths = sim.export(str(tmp_path), "m")
    tensors, initializers, _ = onnx_tensors(paths["onnx"])
    doc = json.loads(open(paths["encodings"]).read())
    assert {e["name"] for e in doc["activation_encodings"]} <= tensors
    assert {e["name"] for e in doc["param_encodings"]} <= initializers
    x = torch.randn(*shape)
    ours = sim.model.eval()(x).detach().numpy()
    theirs = QdqRunner(paths["onnx"], paths["encodings"])(x.numpy())
    out_name = next(reversed(sim.activation_quantizers()))
    step = float(sim.activation_quantizers()[out_name].encoding().scale)
    assert np.abs(ours - theirs).max() <= 3 * step + 1e-6


def test_load_encodings_restores_a_sim_from_exported_files(pretrained, calibration_batches, digits_data, tmp_path):
    sim = calibrated_sim(pretrained, calibration_batches, param_bw=4, output_bw=4, range_learning=True)
    train_epochs(sim.model, digits_data.train, epochs=1, lr=1e-3)
    paths = sim.export(str(tmp_path), "m")
    model = DigitsCNN()
    model.load_state_dict(torch.load(paths["pth"], weights_only=True))
    restored = QuantizationSimModel(model.eval(), calibration_batches[0],
                                    QuantConfig(param_bw=4, output_bw=4, range_learning=True))
    restored.load_encodings(paths["encodings"])
    assert restored.calibrated
    x = digits_data.test.tensors[0]
    a, b = restored.model.eval()(x), sim.model.eval()(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99
    assert torch.allclose(a, b, atol=3 * float(sim.activation_quantizers()["fc"].encoding().scale))


def test_failed_export_writes_nothing(pretrained, calibration_batches, tmp_path):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    with pytest.raises(ExportError, match="compute_encodings"):
        sim.export(str(tmp_path), "m")
    sim.compute_encodings(run_batches, calibration_batches)
    with pytest.raises(ValueError, match="'2.0.0'.*1.0.0, 0.6.1"):
        sim.export(str(tmp_path), "m", encoding_version="2.0.0")
    assert os.listdir(tmp_path) == []
