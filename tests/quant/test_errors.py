"""Bad input: one clear error (one line) naming the value and what is allowed, and nothing changed."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_batches

from orchestrator.quant import (
    EncodingsFileError,
    ExportError,
    NotCalibratedError,
    QdqRunner,
    QuantConfig,
    QuantConfigError,
    QuantError,
    QuantFileError,
    QuantizationSimModel,
)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, QuantError), msg
    return msg


@pytest.mark.parametrize("field", ["param_bw", "output_bw"])
@pytest.mark.parametrize("value", [0, 1, 17, 32, 8.0, True, "8"])
def test_bitwidth_outside_2_to_16(field, value):
    with pytest.raises(QuantConfigError) as err:
        QuantConfig(**{field: value})
    assert f"{field}={value!r}" in one_line(err) and "2 to 16" in str(err.value)


@pytest.mark.parametrize("field", ["quant_scheme", "param_quant_scheme"])
def test_unknown_scheme(field):
    with pytest.raises(QuantConfigError, match=rf"{field}='kl'.*min_max, sqnr, percentile"):
        QuantConfig(**{field: "kl"})


@pytest.mark.parametrize("value", [49.9, 100.01, -1, "99", True])
def test_percentile_outside_50_100(value):
    with pytest.raises(QuantConfigError, match=r"percentile=.*\[50, 100\]"):
        QuantConfig(quant_scheme="percentile", percentile=value)


@pytest.mark.parametrize("overrides,message", [
    ({"*.ln": {"bitwidth": 32}}, r"overrides\['\*.ln'\].bitwidth=32.*2 to 16"),
    ({"*.ln": {"bits": 16}}, r"overrides\['\*.ln'\].bits is not a setting; allowed: bitwidth, enabled"),
    ({"*.ln": {"enabled": "no"}}, r"overrides\['\*.ln'\].enabled='no' must be true or false"),
    ({"": {"enabled": False}}, r"must map a name pattern"),
    (["*.ln"], r"must map name patterns to settings"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(QuantConfigError, match=message):
        QuantConfig(overrides=overrides)


def test_other_config_errors():
    with pytest.raises(QuantConfigError, match="learn_weight_encodings=True needs range_learning=True"):
        QuantConfig(learn_weight_encodings=True)
    with pytest.raises(QuantConfigError, match=r"leaf_modules='layer1' must be a list"):
        QuantConfig(leaf_modules="layer1")
    with pytest.raises(QuantConfigError, match="per_channel=1 must be true or false"):
        QuantConfig(per_channel=1)


def test_valid_edges_are_accepted():
    QuantConfig(param_bw=2, output_bw=16, quant_scheme="percentile", percentile=50)
    QuantConfig(percentile=100, overrides={"fc": {"bitwidth": 16, "enabled": False}}, leaf_modules=["a.b"])


def test_overrides_apply_in_order_by_pattern(pretrained, calibration_batches):
    cfg = QuantConfig(overrides={"conv*": {"bitwidth": 4}, "conv2.*": {"bitwidth": 16}, "fc": {"enabled": False}})
    sim = QuantizationSimModel(pretrained, calibration_batches[0], cfg)
    bw = {n: q.bitwidth for n, q in {**sim.activation_quantizers(), **sim.param_quantizers()}.items()}
    assert bw["conv1.weight"] == 4 and bw["conv2.weight"] == 16 and bw["conv3"] == 4 and bw["relu1"] == 8
    assert not sim.activation_quantizers()["fc"].enabled and sim.activation_quantizers()["relu1"].enabled


def test_forward_before_compute_encodings(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    with pytest.raises(NotCalibratedError, match=r"quantizer 'x' has no encoding yet.*compute_encodings") as err:
        sim.model(calibration_batches[0])
    one_line(err)


def test_bad_model_and_dummy_input(pretrained):
    with pytest.raises(QuantConfigError, match="model must be a torch.nn.Module"):
        QuantizationSimModel(lambda x: x, torch.zeros(1), QuantConfig())
    with pytest.raises(QuantConfigError, match="config must be a QuantConfig"):
        QuantizationSimModel(pretrained, torch.zeros(2, 1, 8, 8), {"param_bw": 8})
    for bad in ([], {}, 3, "x", {1: torch.zeros(1)}):
        with pytest.raises(QuantConfigError, match="dummy_input must be a tensor, a non-empty tuple"):
            QuantizationSimModel(pretrained, bad, QuantConfig())
    with pytest.raises(QuantConfigError) as err:
        QuantizationSimModel(pretrained, torch.randn(2, 3, 5, 5), QuantConfig())
    assert one_line(err).startswith("the model does not run on dummy_input ((2, 3, 5, 5)): RuntimeError: ")
    with pytest.raises(QuantConfigError, match=r"does not run on dummy_input \(pixels=\(2, 1, 8, 8\)\): TypeError"):
        QuantizationSimModel(pretrained, {"pixels": torch.randn(2, 1, 8, 8)}, QuantConfig())


@pytest.fixture(scope="module")
def _exported(_pretrained_digits_cnn, calibration_batches, tmp_path_factory):
    sim = QuantizationSimModel(_pretrained_digits_cnn, calibration_batches[0], QuantConfig())
    sim.compute_encodings(run_batches, calibration_batches)
    return sim, sim.export(str(tmp_path_factory.mktemp("exported")), "m")


@pytest.fixture
def exported(_exported):
    """The digits sim, its exported files and a fresh copy of its encodings document."""
    sim, paths = _exported
    return sim, paths, json.loads(open(paths["encodings"]).read())


def write(tmp_path, doc=None, text=None, data=None):
    p = tmp_path / "bad.encodings"
    if data is not None:
        p.write_bytes(data)
    else:
        p.write_text(text if text is not None else json.dumps(doc))
    return str(p)


def test_exported_file_loads_back(exported):
    sim, paths, _ = exported
    sim.load_encodings(paths["encodings"])


@pytest.mark.parametrize("content,message", [
    ({"text": '{"version": "1.0.0",'}, r"not valid JSON.*line 1 column"),
    ({"data": bytes(range(256)) * 4}, r"not a text file \(an encodings file is JSON\)"),
    ({"data": b"\x89PNG\r\n\x1a\n" + bytes(100)}, r"not a text file"),
    ({"text": "[1, 2]"}, r"top level must be a JSON object, got list"),
    ({"text": ""}, r"not valid JSON"),
])
def test_corrupt_or_binary_encodings_file(exported, tmp_path, content, message):
    sim = exported[0]
    path = write(tmp_path, **content)
    with pytest.raises(EncodingsFileError, match=message) as err:
        sim.load_encodings(path)
    assert one_line(err).startswith(path)


def test_missing_file_or_directory(exported, tmp_path):
    with pytest.raises(EncodingsFileError, match="no such encodings file"):
        exported[0].load_encodings(str(tmp_path / "nope.encodings"))
    with pytest.raises(EncodingsFileError, match="is a directory, not an encodings file"):
        exported[0].load_encodings(str(tmp_path))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["activation_encodings"][0].update(name="not_a_tensor"), r"\['not_a_tensor'\] are not quantized tensors"),
    (lambda d: d["activation_encodings"][0].update(bw=4), r"file has bw=4.*quantizer is bw=8"),
    (lambda d: d["activation_encodings"][0].update(bw=64), r"bit width 64 is not supported; allowed 2-16"),
    (lambda d: d["param_encodings"][0].update(scale=[0.1, 0.2], offset=[-128, -128]),
     r"2 channel\(s\).*32 channel\(s\)"),
    (lambda d: d["param_encodings"][0].update(scale=[s * 1.5 for s in d["param_encodings"][0]["scale"]]),
     r"weight scales differ"),
    (lambda d: d["activation_encodings"][0].update(scale=[-1.0]), r"scale must be > 0"),
    (lambda d: d["activation_encodings"][0].update(scale=[float("nan")]), r"'scale' must hold finite numbers"),
    (lambda d: d["activation_encodings"][0].update(offset=[-1.5]), r"'offset' must hold integers"),
    (lambda d: d["activation_encodings"][0].update(offset=[-300]), r"offset -300.0 is outside \[-255, 0\]"),
    (lambda d: d["activation_encodings"][0].pop("offset"), r"missing field\(s\) \['offset'\]"),
    (lambda d: d["activation_encodings"][0].update(dtype="FLOAT"),
     r"FLOAT format None is not supported; allowed: float8_e4m3fn"),
    (lambda d: d["activation_encodings"].pop(0), r"no encodings for .*partial=True"),
    (lambda d: d.update(version="9.9"), r"version '9.9' is not supported; allowed: 1.0.0, 0.6.1"),
    (lambda d: d.update(activation_encodings={}), r"'activation_encodings' must be a list in version 1.0.0"),
])
def test_encodings_that_do_not_match_the_model(exported, tmp_path, mutate, message):
    sim, _, doc = exported
    before = {n: q.encoding().scale.clone() for n, q in sim.activation_quantizers().items()}
    mutate(doc)
    with pytest.raises(EncodingsFileError, match=message) as err:
        sim.load_encodings(write(tmp_path, doc))
    one_line(err)
    after = {n: q.encoding().scale for n, q in sim.activation_quantizers().items()}
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing changed


def test_partial_load(exported, tmp_path):
    sim, _, doc = exported
    first = doc["activation_encodings"][0]
    first["scale"] = [first["scale"][0] * 2]
    doc["activation_encodings"] = [first]
    doc["param_encodings"] = []
    sim.load_encodings(write(tmp_path, doc), partial=True)
    assert float(sim.activation_quantizers()[first["name"]].encoding().scale) == pytest.approx(first["scale"][0])


def test_export_errors_write_nothing(pretrained, calibration_batches, tmp_path):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    with pytest.raises(ExportError, match="compute_encodings") as err:
        sim.export(str(tmp_path), "m")
    one_line(err)
    sim.compute_encodings(run_batches, calibration_batches)
    with pytest.raises(EncodingsFileError, match="'3.0.0'.*1.0.0, 0.6.1, 2.0.0, 2.1.0"):
        sim.export(str(tmp_path), "m", encoding_version="3.0.0")
    for prefix in ("", "a/b", ".hidden", None):
        with pytest.raises(ExportError, match="filename_prefix=.*plain file name"):
            sim.export(str(tmp_path), prefix)
    assert os.listdir(tmp_path) == []


def test_export_to_an_unwritable_place(pretrained, calibration_batches, tmp_path):
    """A directory under a regular file cannot be created, even by root (these tests may run as root,
    who ignores directory permissions); a read-only directory is tried too when not root."""
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    sim.compute_encodings(run_batches, calibration_batches)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(QuantFileError, match=r"cannot write the export to .*a_file/out") as err:
        sim.export(str(blocker / "out"), "m")
    one_line(err)
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(QuantFileError, match="cannot write the export"):
                sim.export(str(ro), "m")
        finally:
            ro.chmod(0o700)


def test_qdq_runner_on_bad_files(exported, tmp_path):
    _, paths, _ = exported
    with pytest.raises(QuantFileError, match="no such ONNX file") as err:
        QdqRunner(str(tmp_path / "nope.onnx"), paths["encodings"])
    one_line(err)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(QuantFileError, match="not a valid ONNX model"):
        QdqRunner(str(corrupt), paths["encodings"])
    with pytest.raises(EncodingsFileError, match="no such encodings file"):
        QdqRunner(paths["onnx"], str(tmp_path / "nope.encodings"))
    doc = json.loads(open(paths["encodings"]).read())
    doc["activation_encodings"][0]["name"] = "ghost"
    with pytest.raises(EncodingsFileError, match=r"tensors \['ghost'\] are not in"):
        QdqRunner(paths["onnx"], write(tmp_path, doc))
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    with pytest.raises(ValueError, match=r"the ONNX graph takes inputs \['x'\]; got \['y'\]"):
        runner(y=torch.zeros(2, 1, 8, 8).numpy())


