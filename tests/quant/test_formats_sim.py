"""Formats and granularities in a simulation: config and overrides by name, both QAT modes per
block, calibration observers per block, export (encodings 1.0.0 PER_BLOCK / FLOAT / dynamic) and
``QdqRunner`` round trips per preset on a real ``transformers`` model, ``load_encodings``, and
``torch.compile`` per format (one graph, forward equal to eager). Every preset through Hydra into
``QuantConfig`` and compiled in a sim: test_block_formats_sim.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from quant_checks import assert_compiles_like_eager, feed, logits_of, numpy_inputs, run_all, sqnr_db

from orchestrator.quant import QdqRunner, QuantConfig, QuantizationSimModel
from orchestrator.quant.errors import QuantConfigError
from orchestrator.quant.granularity import PerBlock, PerToken

PRESETS = {
    "w4g128": dict(param_bw=4, param_block_size=128, quantize_activations=False),
    "w4g32a8": dict(param_bw=4, param_block_size=32, output_bw=8, output_granularity="per_token"),
    "fp8": dict(param_format="float8_e4m3fn", output_format="float8_e4m3fn", quant_scheme="min_max"),
}


def gpt2():
    """GPT-2's ``Conv1D`` weights are ``[in, out]``: blocks run along axis 0, and the exporter keeps them.

    LayerNorm weights and biases are varied as trained ones are: at their init (1, 0) a LayerNorm
    after a per-token quantizer maps each token's integer grid onto one shifted grid, so every
    element of a row sits at the same fraction of a step, and a row whose fraction is 0.5 flips
    as a whole on a last-bit difference between torch's and onnxruntime's LayerNorm."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model


def tokens(seed: int, n: int = 2) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 100, (n, 16), generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def model():
    return gpt2()


def sim_of(model, **cfg) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, tokens(0), QuantConfig(**cfg))
    sim.compute_encodings(run_all, [tokens(s) for s in range(3)])
    return sim


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,message", [
    (dict(param_format="fp8"), "param_format='fp8' is not a known format; allowed: int, float8_e4m3fn"),
    (dict(param_block_size=-32), "param_block_size=-32 is not a block size"),
    (dict(param_block_size=32, per_channel=False), "param_block_size=32 needs per_channel=True"),
    (dict(output_granularity="per_row"), "output_granularity='per_row' is not allowed; allowed: per_tensor, per_token"),
    (dict(param_format="float8_e4m3fn", param_quant_scheme="sqnr"),
     r"param_quant_scheme='sqnr' is not available for format 'float8_e4m3fn' \(the sqnr search is for integer "
     r"grids\); allowed: min_max, percentile"),
    (dict(output_format="float8_e4m3fn"),  # the default activation calibration, sqnr
     r"quant_scheme='sqnr' is not available for format 'float8_e4m3fn' \(the sqnr search"),
    (dict(overrides={"*.mlp.*": {"block_size": "32"}}),
     r"overrides\['\*.mlp.\*'\].block_size='32' is not a block size"),
    (dict(overrides={"*": {"format": "int3"}}), r"overrides\['\*'\].format='int3' is not a known format"),
])
def test_bad_format_settings_name_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(QuantConfigError, match=message):
        QuantConfig(**kwargs)


def test_a_partial_last_block_is_an_error_naming_the_weight():
    model = torch.nn.Sequential(torch.nn.Linear(48, 8))
    with pytest.raises(QuantConfigError, match=r"weight '0.weight' of shape \[8, 48\]: dim 1 of size 48 is not a "
                                               "multiple of block_size=32"):
        QuantizationSimModel(model, torch.randn(2, 48), QuantConfig(param_block_size=32))


def test_overrides_set_format_and_granularity_by_name(model):
    """Mixed precision by name: attention FP8, MLP int4 g32, the head int8 per channel, per-token activations."""
    cfg = QuantConfig(param_bw=4, param_block_size=32, overrides={
        "*.attn.c_attn.weight": {"format": "float8_e4m3fn", "block_size": 0},
        "transformer.wte.weight": {"bitwidth": 8, "block_size": 0},  # tied: lm_head shares it
        "*.mlp.c_fc": {"granularity": "per_token"}})
    sim = QuantizationSimModel(model, tokens(0), cfg)
    params, acts = sim.param_quantizers(), sim.activation_quantizers()
    attn, fc, head = params["transformer.h.0.attn.c_attn.weight"], params["transformer.h.0.mlp.c_fc.weight"], \
        params["transformer.wte.weight"]
    assert attn.format.name == "float8_e4m3fn" and attn.axis == 1 and not isinstance(attn.granularity, PerBlock)
    assert isinstance(fc.granularity, PerBlock) and fc.scale_shape == (2, 256)  # Conv1D [in=64, out=256]
    assert head.bitwidth == 8 and head.scale_shape == (100,)  # tied with lm_head: the first name is wte
    assert isinstance(acts["transformer.h.0.mlp.c_fc"].granularity, PerToken)
    assert not isinstance(acts["transformer.h.0.mlp.c_proj"].granularity, PerToken)
    assert "float8_e4m3fn" in sim.summary() and "blocks [2, 256] (axis 1, block axis 0)" in sim.summary()


# ---------------------------------------------------------------------------- QAT modes per block
def test_static_mode_block_encodings_follow_the_weights(model):
    sim = sim_of(model, **PRESETS["w4g32a8"])
    entry = sim.quantized_params()["transformer.h.0.mlp.c_proj.weight"]  # Conv1D [256, 64]: 8 blocks of 32 rows
    q = entry.quantizer
    before = q.encoding(entry.values()).scale.clone()
    assert before.shape == (8, 64) and q.encoding(entry.values()).block_size == 32
    with torch.no_grad():
        entry.param[32:64] *= 2.0  # block 1 of every column
    after = q.encoding(entry.values()).scale
    torch.testing.assert_close(after[1], before[1] * 2)
    assert torch.equal(after[0], before[0])


def test_range_learning_trains_per_block_weight_scales_by_lsq(model):
    sim = sim_of(model, param_bw=4, param_block_size=32, range_learning=True, learn_weight_encodings=True)
    q = sim.param_quantizers()["transformer.h.0.mlp.c_fc.weight"]
    assert q.learnable and q.log_scale.shape == (2, 256)
    opt = torch.optim.Adam(sim.quantizer_parameters(), lr=1e-2)
    start = q.log_scale.detach().clone()
    for seed in range(3):
        out = logits_of(feed(sim.model, tokens(10 + seed)))
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 100), tokens(10 + seed)["input_ids"][:, 1:]
                                                 .reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0
        opt.step()
    moved = (q.log_scale.detach() - start).abs()
    assert (moved > 0).float().mean() > 0.9  # nearly every block's scale trained


def test_fp8_range_learning_trains_activation_and_weight_scales_only(model):
    sim = sim_of(model, **PRESETS["fp8"], range_learning=True, learn_weight_encodings=True)
    act = sim.activation_quantizers()["transformer.h.0.mlp.c_fc"]
    assert act.format.name == "float8_e4m3fn" and act.learnable and not isinstance(act.offset, torch.nn.Parameter)
    names = {n.rsplit(".", 1)[-1] for n, _ in sim.model.named_parameters() if "quantizers" in n}
    assert names == {"log_scale"}  # float grids have no offset to learn
    opt = torch.optim.Adam(sim.quantizer_parameters(), lr=1e-2)
    before = act.log_scale.detach().clone()
    out = logits_of(feed(sim.model, tokens(11)))
    out.square().mean().backward()
    opt.step()
    assert not torch.equal(before, act.log_scale.detach())


@pytest.mark.parametrize("scheme", ["sqnr", "percentile"])
def test_weight_observers_work_per_block(model, scheme):
    sim = sim_of(model, param_bw=4, param_block_size=32, param_quant_scheme=scheme, percentile=90.0)
    entry = sim.quantized_params()["transformer.h.1.attn.c_attn.weight"]
    q = entry.quantizer
    assert q.ratio.shape == (2, 192) and bool((q.ratio <= 1).all()) and bool((q.ratio < 1).any())
    full = sim_of(model, param_bw=4, param_block_size=32).quantized_params()["transformer.h.1.attn.c_attn.weight"]
    mse = lambda e: float((e.quantizer(e.values()) - e.values()).square().sum())  # noqa: E731
    if scheme == "sqnr":  # the search never loses to min-max on the squared error of the weight
        assert mse(entry) <= mse(full)


# ---------------------------------------------------------------------------- export and QDQ
@pytest.mark.parametrize("preset", list(PRESETS))
def test_export_and_qdq_runner_agree_with_the_simulation(model, preset, tmp_path):
    sim = sim_of(model, **PRESETS[preset])
    paths = sim.export(str(tmp_path), "m")
    doc = json.load(open(paths["encodings"]))
    params = {e["name"]: e for e in doc["param_encodings"]}
    fc = params["transformer.h.0.mlp.c_fc.weight"]
    if preset.startswith("w4g"):
        block = 32 if preset == "w4g32a8" else 64  # 128 > 64 inputs: one block per column
        assert (fc["enc_type"], fc["block_size"], fc["axis"], fc["block_axis"], fc["dtype"]) == \
            ("PER_BLOCK", block, 1, 0, "INT")
        assert len(fc["scale"]) == 256 * 64 // block
    else:
        assert (fc["enc_type"], fc["dtype"], fc["format"], fc["bw"]) == ("PER_CHANNEL", "FLOAT", "float8_e4m3fn", 8)
    if preset == "w4g32a8":
        assert doc["dynamic_activation_encodings"] and doc["activation_encodings"] == []  # every one per token
    if preset == "w4g128":
        assert doc["activation_encodings"] == []
    batch = tokens(7)
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    args, kwargs = numpy_inputs(batch)
    theirs = runner(*args, **kwargs)
    with torch.no_grad():
        ours = logits_of(feed(sim.model, batch)).numpy()
    # Static activations (fp8): the graphs agree exactly. Weight-only (w4g128): torch's and
    # onnxruntime's float matmuls differ in the last bits, nothing else. Per-token (w4g32a8): a
    # token's scale comes from its float values, so a last-bit difference of a float op
    # (LayerNorm, softmax, tanh) moves the scale of that token and flips a few steps downstream;
    # the per-token nodes themselves compute exactly the simulation's math
    # (``test_per_token_qdq_nodes_equal_the_simulation_bit_for_bit``).
    floor = {"fp8": 200, "w4g128": 100, "w4g32a8": 30}[preset]
    assert sqnr_db(ours, theirs) > floor, sqnr_db(ours, theirs)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= (0.95 if preset == "w4g32a8" else 1.0)

    again = QuantizationSimModel(model, tokens(0), QuantConfig(**PRESETS[preset]))
    again.load_encodings(paths["encodings"])
    with torch.no_grad():
        assert torch.equal(logits_of(feed(again.model, batch)), logits_of(feed(sim.model, batch)))


def test_blocked_qdq_nodes_equal_the_reference_bit_for_bit(model, tmp_path):
    """The weights alone: onnxruntime's blocked int4 Q/DQ of each exported weight is the simulation's."""
    import onnx
    from onnx import numpy_helper

    from orchestrator.quant.qdq import build_qdq_model

    sim = sim_of(model, **PRESETS["w4g32a8"])
    paths = sim.export(str(tmp_path), "m")
    qdq = build_qdq_model(paths["onnx"], paths["encodings"])
    name = "transformer.h.0.mlp.c_fc.weight"
    qdq.graph.output.append(onnx.helper.make_tensor_value_info(f"{name}__qdq", onnx.TensorProto.FLOAT, None))
    _, kwargs = numpy_inputs(tokens(1))
    theirs = _ort_session(qdq).run([f"{name}__qdq"], kwargs)[0]
    entry = sim.quantized_params()[name]
    with torch.no_grad():
        ours = entry.quantizer(entry.values()).numpy()
    init = {i.name: i for i in qdq.graph.initializer}
    assert numpy_helper.to_array(init[name]).shape == ours.shape
    np.testing.assert_array_equal(theirs, ours)


def _ort_session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_per_token_qdq_nodes_equal_the_simulation_bit_for_bit(model, tmp_path):
    """Each dynamic activation: onnxruntime's per-token nodes on onnxruntime's own float tensor give
    exactly what the simulation's quantizer gives on that tensor."""
    import onnx

    from orchestrator.quant.qdq import build_qdq_model

    sim = sim_of(model, **PRESETS["w4g32a8"])
    paths = sim.export(str(tmp_path), "m")
    names = [e["name"] for e in json.load(open(paths["encodings"]))["dynamic_activation_encodings"]]
    qdq = build_qdq_model(paths["onnx"], paths["encodings"])
    checked = [n for n in names if n in sim.activation_quantizers()][:12]
    for n in checked:
        for out in (f"{n}__float", n):
            qdq.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    _, kwargs = numpy_inputs(tokens(3))
    values = _ort_session(qdq).run([o for n in checked for o in (f"{n}__float", n)], kwargs)
    assert len(checked) >= 10
    for i, n in enumerate(checked):
        with torch.no_grad():
            ours = sim.activation_quantizers()[n](torch.from_numpy(values[2 * i])).numpy()
        np.testing.assert_array_equal(values[2 * i + 1], ours, err_msg=n)


def test_float4_weights_are_checked_by_onnx_reference_and_float4_activations_refused(model, tmp_path):
    """onnxruntime has no FP4 QuantizeLinear kernel: FP4 weights are quantized by ``onnx.reference``
    (said in one line per weight, and warned), FP4 activations are refused in one line."""
    sim = sim_of(model, param_format="float4_e2m1", quantize_activations=False)
    paths = sim.export(str(tmp_path), "m")
    with pytest.warns(UserWarning, match="checked by onnx.reference instead"):
        runner = QdqRunner(paths["onnx"], paths["encodings"])
    assert len(runner.notes) >= len(sim.quantized_params())  # a tied weight may have a transposed copy too
    assert all("onnxruntime has no float4_e2m1 QuantizeLinear kernel" in n and "\n" not in n for n in runner.notes)
    args, kwargs = numpy_inputs(tokens(7))
    with torch.no_grad():
        ours = logits_of(feed(sim.model, tokens(7))).numpy()
    assert sqnr_db(ours, runner(*args, **kwargs)) > 100
    acts = sim_of(model, output_format="float4_e2m1", quant_scheme="min_max")
    paths = acts.export(str(tmp_path / "acts"), "m")
    with pytest.raises(Exception, match=r"onnxruntime has no QuantizeLinear for float4_e2m1 \(activation '") as err:
        QdqRunner(paths["onnx"], paths["encodings"])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- presets and compile
def _quantizers():
    from orchestrator.quant import QuantizeDequantize
    from orchestrator.quant.formats import FORMATS

    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    a = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    block = dict(channels=128, axis=0, granularity=PerBlock(0, 1, 32), shape=(128, 64))
    fixed_fp8 = QuantizeDequantize("a", 8, True, fmt=FORMATS["float8_e4m3fn"])
    fixed_fp8.set_range(torch.tensor([-3.0]), torch.tensor([3.0]))
    learned = QuantizeDequantize("w", 4, True, learnable=True, **block)
    learned.set_encoding(torch.rand(128, 2) + 0.1)
    return {
        "int4 g32 follow": (QuantizeDequantize("w", 4, True, follow=True, **block), w),
        "int4 g32 learned": (learned, w),
        "int8 per token": (QuantizeDequantize("a", 8, False, granularity=PerToken()), a),
        "fp8 per channel follow": (QuantizeDequantize("w", 8, True, channels=128, axis=0, follow=True,
                                                      fmt=FORMATS["float8_e4m3fn"]), w),
        "fp8 per tensor fixed": (fixed_fp8, a),
        "fp4 per channel follow": (QuantizeDequantize("w", 4, True, channels=128, axis=0, follow=True,
                                                      fmt=FORMATS["float4_e2m1"]), w),
        "bf16 cast": (QuantizeDequantize("a", 16, True, fmt=FORMATS["bfloat16"]), a),
    }


@pytest.mark.parametrize("kind", list(_quantizers()))
def test_each_format_compiles_to_one_graph_bit_equal_to_eager(kind):
    """Per quantizer: one graph, no break, forward and gradients equal to eager. The
    quantize-dequantize is one opaque op; a weight that follows its tensor or a per-token
    activation adds the ops computing its encoding (min/max, scale) around it."""
    assert_compiles_like_eager(*_quantizers()[kind])


@pytest.mark.slow
def test_a_trial_runs_blocked_weights_and_per_token_activations_end_to_end(tmp_path, baseline_cache):
    """``quant.param_block_size``/``quant.output_granularity`` reach the simulation of a real trial
    (digits CNN: conv weights in blocks of 8 input channels, kernels sharing their block's scale),
    which trains, evaluates and exports PER_BLOCK encodings."""
    from helpers_trial import trial_config

    from orchestrator.train.launcher import run_trial

    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 1, "quant.param_bw": 4,
                                                     "quant.param_block_size": 8,
                                                     "quant.output_granularity": "per_token"})
    result = run_trial(cfg)
    assert result.metrics["status"] == "finished" and result.metrics["test_acc"] >= result.metrics["fp32_acc"] - 5
    doc = json.load(open(tmp_path / "trial" / "export" / "model.encodings"))
    blocked = {e["name"]: e for e in doc["param_encodings"] if e["enc_type"] == "PER_BLOCK"}
    conv2 = blocked["conv2.weight"]
    assert (conv2["block_size"], conv2["axis"], conv2["block_axis"]) == (8, 0, 1)
    assert blocked["conv1.weight"]["block_size"] == 1  # one input channel: one block per row
    assert doc["dynamic_activation_encodings"]
