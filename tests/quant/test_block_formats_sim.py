"""The block-format presets (w4lpbq, mxfp8, mxfp4, nvfp4) in a simulation of a real ``transformers``
model: Hydra presets, the encodings file per version (1.0.0 LPBQ, 2.0.0, 2.1.0 meta encodings),
``QdqRunner`` round trips (weights bit for bit: onnxruntime's Q/DQ where it has the kernel,
``onnx.reference`` for FP4), ``load_encodings``, and ``torch.compile`` of each preset's sim."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from quant_checks import feed, logits_of, numpy_inputs, run_all, sqnr_db
from test_formats_sim import PRESETS as EARLIER
from test_formats_sim import _ort_session, gpt2, sim_of, tokens

from orchestrator.quant import QdqRunner, QuantConfig, QuantizationSimModel
from orchestrator.quant.errors import EncodingsFileError
from orchestrator.quant.qdq import build_qdq_model

PRESETS = {
    "w4lpbq": dict(param_bw=4, param_format="lpbq", param_block_size=64, output_bw=16),
    "mxfp8": dict(param_format="mxfp8", output_format="mxfp8"),
    "mxfp4": dict(param_format="mxfp4", output_format="mxfp4"),
    "nvfp4": dict(param_format="nvfp4", output_format="nvfp4"),
}
FC = "transformer.h.0.mlp.c_fc.weight"  # GPT-2 Conv1D [in=64, out=256]: blocks run along axis 0


@pytest.fixture(scope="module")
def model():
    return gpt2()


@pytest.mark.parametrize("preset", list(EARLIER) + list(PRESETS))
def test_hydra_presets_reach_quant_config(preset):
    from helpers_sweep import hydra_app
    from omegaconf import OmegaConf

    from orchestrator.train.config import TrialConfig

    with hydra_app("train", (f"quant={preset}",)) as (_, master):
        quant = OmegaConf.to_container(master.quant, resolve=True)
    cfg = TrialConfig.from_dict({"quant": quant}).quant_config()
    for key, value in {**EARLIER, **PRESETS}[preset].items():
        assert getattr(cfg, key) == value, key


def _weights_through_the_qdq_graph(paths, names):
    """Each weight as the QDQ graph feeds it to its consumer: onnxruntime's Q/DQ output, or the
    initializer onnx.reference computed (FP4)."""
    qdq = build_qdq_model(paths["onnx"], paths["encodings"])
    inits = {i.name: i for i in qdq.graph.initializer}
    out, ran = {}, []
    for n in names:
        if f"{n}__qdq" in inits:
            out[n] = numpy_helper.to_array(inits[f"{n}__qdq"])
        else:
            qdq.graph.output.append(onnx.helper.make_tensor_value_info(f"{n}__qdq", onnx.TensorProto.FLOAT, None))
            ran.append(n)
    if ran:
        _, kwargs = numpy_inputs(tokens(1))
        out.update(zip(ran, _ort_session(qdq).run([f"{n}__qdq" for n in ran], kwargs)))
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_export_and_qdq_runner_agree_with_the_simulation(model, preset, tmp_path):
    sim = sim_of(model, **PRESETS[preset])
    paths = sim.export(str(tmp_path), "m")
    doc = json.load(open(paths["encodings"]))
    assert doc["version"] == ("1.0.0" if preset == "w4lpbq" else "2.1.0")  # MX/NVFP4 have no 1.0.0 form
    names = [n for n in sim.quantized_params() if n.startswith("transformer.h.")]
    theirs_w = _weights_through_the_qdq_graph(paths, names)
    for n in names:  # the contract: exact, whichever implementation ran the Q/DQ
        entry = sim.quantized_params()[n]
        with torch.no_grad():
            ours = entry.quantizer(entry.values()).numpy()
        np.testing.assert_array_equal(theirs_w[n], ours, err_msg=n)

    runner = QdqRunner(paths["onnx"], paths["encodings"])
    assert bool(runner.notes) == (preset in ("mxfp4", "nvfp4"))
    assert all("onnxruntime has no float4_e2m1 QuantizeLinear kernel; quantized by onnx.reference" in line
               for line in runner.notes)
    batch = tokens(7)
    args, kwargs = numpy_inputs(batch)
    theirs = runner(*args, **kwargs)
    with torch.no_grad():
        ours = logits_of(feed(sim.model, batch)).numpy()
    # Float matmuls may differ in the last bits, nothing else: w4lpbq's static 16-bit activations
    # pass such differences on as an occasional one-step flip; the dynamic MX/NVFP4 activations
    # (onnxruntime computes their block scales from the same float32 values) agree exactly here.
    assert sqnr_db(ours, theirs) > (80 if preset == "w4lpbq" else 100), sqnr_db(ours, theirs)
    dynamic = doc.get("dynamic_activation_encodings", [])
    assert len(dynamic) == (0 if preset == "w4lpbq" else len(sim.activation_quantizers()))
    assert all(e["granularity"] == "PER_TOKEN_BLOCK" and e["block_size"] == (16 if preset == "nvfp4" else 32)
               for e in dynamic)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()

    again = QuantizationSimModel(model, tokens(0), QuantConfig(**PRESETS[preset]))
    again.load_encodings(paths["encodings"])
    with torch.no_grad():
        assert torch.equal(logits_of(feed(again.model, batch)), logits_of(feed(sim.model, batch)))


def _entry(doc, name):
    key = "encodings" if doc["version"].startswith("2.") else "param_encodings"
    return next(e for e in doc[key] if e["name"] == name)


def test_lpbq_entries_follow_aimets_spec_in_each_version(model, tmp_path):
    sim = sim_of(model, **PRESETS["w4lpbq"])
    enc = sim.quantized_params()[FC].quantizer.encoding(sim.quantized_params()[FC].values())
    ints, channel = enc.inner, enc.outer  # [2, 256] and [1, 256]: Conv1D's channels are on axis 1
    docs = {v: json.load(open(sim.export(str(tmp_path / v), "m", encoding_version=v)["encodings"]))
            for v in ("1.0.0", "2.0.0", "2.1.0")}
    e = _entry(docs["1.0.0"], FC)
    assert {k: e[k] for k in ("enc_type", "dtype", "bw", "compressed_bw", "is_sym", "block_size")} == \
        {"enc_type": "LPBQ", "dtype": "INT", "bw": 8, "compressed_bw": 4, "is_sym": True, "block_size": 64}
    assert e["scale"] == channel.reshape(-1).tolist() and e["offset"] == [-128] * 256
    assert e["per_block_int_scale"] == ints.T.reshape(-1).int().tolist()  # channel-major [channels, blocks]
    e = _entry(docs["2.0.0"], FC)
    assert (e["output_dtype"], e["axis"], e["block_size"]) == ("int4", 0, 64) and "y_scale" not in e
    assert e["per_block_int_scale"] == ints.int().tolist() and e["per_channel_float_scale"] == channel.tolist()
    e = _entry(docs["2.1.0"], FC)
    assert e["y_scale"] == {"x": ints.int().tolist(), "x_scale": channel.reshape(-1).tolist(), "axis": 1}
    assert (e["output_dtype"], e["axis"], e["block_size"]) == ("int4", 0, 64)


def test_nvfp4_and_mx_entries_in_2_x_and_1_0_0_refused(model, tmp_path):
    sim = sim_of(model, **PRESETS["nvfp4"])
    e = _entry(json.load(open(sim.export(str(tmp_path), "m")["encodings"])), FC)
    assert (e["output_dtype"], e["axis"], e["block_size"]) == ("float4e2m1", 0, 16)
    assert e["y_scale"]["input_dtype"] == "float8e4m3fn" and isinstance(e["y_scale"]["x_scale"], float)
    x = torch.tensor(e["y_scale"]["x"])
    assert x.shape == (4, 256) and torch.equal(x.to(torch.float8_e4m3fn).float(), x)
    with pytest.raises(EncodingsFileError, match="encoding version 1.0.0 cannot hold NVFP4 encodings; allowed for "
                                                 "them: 2.0.0, 2.1.0"):
        sim.export(str(tmp_path / "old"), "m", encoding_version="1.0.0")
    mx = sim_of(model, **PRESETS["mxfp4"])
    e = _entry(json.load(open(mx.export(str(tmp_path / "mx"), "m", encoding_version="2.0.0")["encodings"])), FC)
    scale = np.array(e["y_scale"])
    assert e["output_dtype"] == "float4e2m1" and scale.shape == (2, 256) and e["block_format"] == "mx"
    assert np.all(np.exp2(np.round(np.log2(scale))) == scale)


@pytest.mark.parametrize("preset", list(EARLIER) + list(PRESETS))
def test_compiled_sim_of_each_preset_is_one_graph(preset):
    """``torch.compile(sim.model, fullgraph=True)`` traces every preset without a break. (Compiled
    GELU/matmul differ from eager in the last bits, which per-token scales and weight-only
    quantization pass on, so the model-level check is closeness, not equality.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    batches = [torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    sim = QuantizationSimModel(mlp, batches[0], QuantConfig(**{**EARLIER, **PRESETS}[preset]))
    sim.compute_encodings(run_all, batches)
    explained = torch._dynamo.explain(sim.model)(batches[1])
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    compiled = torch.compile(sim.model, fullgraph=True)
    with torch.no_grad():
        eager, comp = sim.model(batches[1]), compiled(batches[1])
    assert sqnr_db(eager, comp) > 40, sqnr_db(eager, comp)
    torch._dynamo.reset()


def test_range_learning_trains_lpbq_channel_scales_and_the_export_stays_exact(model, tmp_path):
    sim = sim_of(model, **PRESETS["w4lpbq"], range_learning=True, learn_weight_encodings=True)
    proj = "transformer.h.0.mlp.c_proj.weight"  # Conv1D [in=256, out=64]: 4 blocks of 64 per channel
    q = sim.param_quantizers()[proj]
    assert q.learnable and q.log_scale.shape == (1, 64) and q.block_int.shape == (4, 64)
    ints, start = q.block_int.clone(), q.log_scale.detach().clone()
    opt = torch.optim.Adam(sim.quantizer_parameters(), lr=1e-2)
    for seed in range(2):
        out = logits_of(feed(sim.model, tokens(10 + seed)))
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 100),
                                                 tokens(10 + seed)["input_ids"][:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (q.log_scale.detach() != start).float().mean() > 0.9 and torch.equal(q.block_int, ints)
    paths = sim.export(str(tmp_path), "m", encoding_version="2.1.0")
    theirs = _weights_through_the_qdq_graph(paths, [proj])[proj]
    with torch.no_grad():
        ours = q(sim.quantized_params()[proj].values()).numpy()
    np.testing.assert_array_equal(theirs, ours)


@pytest.mark.parametrize("preset", ["fp8", "w4g32a8"])
def test_earlier_presets_round_trip_through_encodings_2_0_0(model, preset, tmp_path):
    """2.x on request for every format: per-channel float8 and per-block int4 entries, dynamic
    per-token activations; onnxruntime and ``load_encodings`` read them back."""
    sim = sim_of(model, **EARLIER[preset])
    paths = sim.export(str(tmp_path), "m", encoding_version="2.0.0")
    doc = json.load(open(paths["encodings"]))
    e = _entry(doc, FC)
    if preset == "fp8":
        assert (e["output_dtype"], e["axis"], len(e["y_scale"])) == ("float8e4m3fn", 1, 256)
        assert any(not x["is_param"] and isinstance(x["y_scale"], float) for x in doc["encodings"])
    else:
        assert (e["output_dtype"], e["axis"], e["block_size"], np.shape(e["y_scale"])) == ("int4", 0, 32, (2, 256))
        assert doc["dynamic_activation_encodings"]
    batch = tokens(7)
    args, kwargs = numpy_inputs(batch)
    theirs = QdqRunner(paths["onnx"], paths["encodings"])(*args, **kwargs)
    with torch.no_grad():
        ours = logits_of(feed(sim.model, batch)).numpy()
    assert sqnr_db(ours, theirs) > (200 if preset == "fp8" else 30)
    again = QuantizationSimModel(model, tokens(0), QuantConfig(**EARLIER[preset]))
    again.load_encodings(paths["encodings"])
    with torch.no_grad():
        assert torch.equal(logits_of(feed(again.model, batch)), logits_of(feed(sim.model, batch)))


@pytest.mark.parametrize("preset,version", [(p, v) for p in PRESETS for v in ("1.0.0", "2.0.0", "2.1.0")
                                             if v != "1.0.0" or p == "w4lpbq"])  # MX/NVFP4: no 1.0.0 form
def test_transposed_weight_copies_carry_their_two_level_scales(preset, version, tmp_path):
    """A Linear on a 3-D input exports its weight as a transposed copy (``0.weight.T``, blocks on
    axis 0): the block scales, integers and per-channel scales are transposed with it."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    batches = [torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    sim = QuantizationSimModel(mlp, batches[0], QuantConfig(**PRESETS[preset]))
    sim.compute_encodings(run_all, batches)
    paths = sim.export(str(tmp_path), "m", encoding_version=version)
    doc = json.load(open(paths["encodings"]))
    assert {"0.weight.T", "2.weight.T"} <= {e["name"] for e in doc.get("encodings", doc.get("param_encodings", []))}
    with pytest.warns(UserWarning) if preset in ("mxfp4", "nvfp4") else _no_warning():
        theirs = QdqRunner(paths["onnx"], paths["encodings"])(batches[1].numpy())
    with torch.no_grad():
        ours = sim.model(batches[1]).numpy()
    # weight-only: last bits of the float matmuls; w4lpbq's static activations: the graphs agree
    assert sqnr_db(ours, theirs) > (200 if preset == "w4lpbq" else 100)
    again = QuantizationSimModel(mlp, batches[0], QuantConfig(**PRESETS[preset]))
    again.load_encodings(paths["encodings"])
    with torch.no_grad():
        assert torch.equal(again.model(batches[1]), sim.model(batches[1]))


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            yield
    return ctx()


def test_export_agreement_of_an_nvfp4_export_says_which_weights_onnx_reference_ran(model, tmp_path):
    from orchestrator.quant import export_agreement

    sim = sim_of(model, **PRESETS["nvfp4"])
    paths = sim.export(str(tmp_path), "m")
    with pytest.warns(UserWarning, match="checked by onnx.reference instead"):
        agreement = export_agreement(sim, paths, [tokens(7)])
    assert agreement.top1 == 1.0 and agreement.problem(100.0) is None
    assert any(n.startswith(f"{FC}: onnxruntime has no float4_e2m1") for n in agreement.notes)


@pytest.mark.parametrize("edit,message", [
    (dict(block_format="lpbq"), "PER_TOKEN_BLOCK needs block_format in mx, nvfp4 and a positive integer block_size; "
                                "got 'lpbq', 32"),
    (dict(block_size=0), "got 'mx', 0"),
    (dict(block_size=16), "file has a dynamic MX blocks of 16 float4_e2m1 4-bit encoding; the model's quantizer is "
                          "dynamic float4_e2m1 4-bit MX blocks of 32 along the last dim"),
])
def test_a_bad_dynamic_block_entry_is_one_line(model, edit, message, tmp_path):
    sim = sim_of(model, **PRESETS["mxfp4"])
    paths = sim.export(str(tmp_path), "m")
    doc = json.load(open(paths["encodings"]))
    doc["dynamic_activation_encodings"][0].update(edit)
    json.dump(doc, open(paths["encodings"], "w"))
    again = QuantizationSimModel(model, tokens(0), QuantConfig(**PRESETS["mxfp4"]))
    with pytest.raises(EncodingsFileError, match=message) as info:
        again.load_encodings(paths["encodings"])
    assert "\n" not in str(info.value)
