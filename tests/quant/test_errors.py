"""Bad input: one clear error naming the value and what is allowed."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_batches

from orchestrator.quant import (
    EncodingsFileError,
    NotCalibratedError,
    QuantConfig,
    QuantConfigError,
    QuantizationSimModel,
)


@pytest.mark.parametrize("field", ["param_bw", "output_bw"])
@pytest.mark.parametrize("value", [0, 1, 17, 32, 8.0, True, "8"])
def test_bitwidth_outside_2_to_16(field, value):
    with pytest.raises(QuantConfigError) as err:
        QuantConfig(**{field: value})
    assert f"{field}={value!r}" in str(err.value) and "2 to 16" in str(err.value)


def test_unknown_scheme():
    with pytest.raises(QuantConfigError, match=r"quant_scheme='kl'.*min_max, sqnr, percentile"):
        QuantConfig(quant_scheme="kl")


@pytest.mark.parametrize("value", [49.9, 100.01, -1, "99"])
def test_percentile_outside_50_100(value):
    with pytest.raises(QuantConfigError, match=r"percentile=.*\[50, 100\]"):
        QuantConfig(quant_scheme="percentile", percentile=value)


def test_valid_edges_are_accepted():
    QuantConfig(param_bw=2, output_bw=16, quant_scheme="percentile", percentile=50)
    QuantConfig(percentile=100)


def test_forward_before_compute_encodings(pretrained, calibration_batches):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    with pytest.raises(NotCalibratedError, match=r"compute_encodings"):
        sim.model(calibration_batches[0])


def test_bad_dummy_input(pretrained):
    with pytest.raises(QuantConfigError, match="dummy_input"):
        QuantizationSimModel(pretrained, [1, 2, 3], QuantConfig())
    with pytest.raises(QuantConfigError, match=r"does not run on dummy_input \(shapes \[\(2, 3, 5, 5\)\]\)"):
        QuantizationSimModel(pretrained, torch.randn(2, 3, 5, 5), QuantConfig())


@pytest.fixture
def exported(pretrained, calibration_batches, tmp_path):
    sim = QuantizationSimModel(pretrained, calibration_batches[0], QuantConfig())
    sim.compute_encodings(run_batches, calibration_batches)
    paths = sim.export(str(tmp_path), "m")
    return sim, paths["encodings"], json.loads(open(paths["encodings"]).read())


def write(tmp_path, doc, text=None):
    p = tmp_path / "bad.encodings"
    p.write_text(text if text is not None else json.dumps(doc))
    return str(p)


def test_malformed_json(exported, tmp_path):
    sim, _, _ = exported
    with pytest.raises(EncodingsFileError, match=r"not valid JSON.*line 1 column"):
        sim.load_encodings(write(tmp_path, None, text='{"version": "1.0.0",'))


def test_missing_file(exported, tmp_path):
    with pytest.raises(EncodingsFileError, match="no such encodings file"):
        exported[0].load_encodings(str(tmp_path / "nope.encodings"))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["activation_encodings"][0].update(name="not_a_tensor"), r"\['not_a_tensor'\] are not quantized tensors"),
    (lambda d: d["activation_encodings"][0].update(bw=4), r"file has bw=4.*quantizer is bw=8"),
    (lambda d: d["activation_encodings"][0].update(bw=64), r"bit width 64 is not supported; allowed 2-16"),
    (lambda d: d["param_encodings"][0].update(scale=[0.1, 0.2], offset=[-128, -128]), r"2 channel\(s\).*32 channel\(s\)"),
    (lambda d: d["param_encodings"][0].update(scale=[s * 1.5 for s in d["param_encodings"][0]["scale"]]),
     r"weight scales differ"),
    (lambda d: d["activation_encodings"][0].update(scale=[-1.0]), r"scale must be > 0"),
    (lambda d: d["activation_encodings"][0].pop("offset"), r"missing field\(s\) \['offset'\]"),
    (lambda d: d["activation_encodings"].pop(0), r"no encodings for"),
    (lambda d: d.update(version="9.9"), r"version '9.9' is not supported; allowed: 1.0.0, 0.6.1"),
])
def test_encodings_that_do_not_match_the_model(exported, tmp_path, mutate, message):
    sim, _, doc = exported
    before = {n: q.encoding().scale.clone() for n, q in sim.activation_quantizers().items()}
    mutate(doc)
    with pytest.raises(EncodingsFileError, match=message):
        sim.load_encodings(write(tmp_path, doc))
    after = {n: q.encoding().scale for n, q in sim.activation_quantizers().items()}
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing changed


def test_partial_load(exported, tmp_path):
    sim, _, doc = exported
    doc["activation_encodings"] = doc["activation_encodings"][:1]
    sim.load_encodings(write(tmp_path, doc), partial=True)
