"""``QuantConfig.activation_sites``: AIMET's placement (every op output) or only the inputs of the
weighted layers (torchao's 8da4w, ModelOpt's W4A4/NVFP4), on real ``transformers`` models: which
quantizers exist, that the attention then runs as written, the export round trip in onnxruntime,
one-line errors, and the key through a trial's config."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from quant_checks import feed, logits_of, numpy_inputs, sqnr_db
from test_formats_sim import gpt2, sim_of, tokens

from orchestrator.quant import QdqRunner, QuantConfig
from orchestrator.quant.errors import QuantConfigError

W4G32A8 = dict(param_bw=4, param_block_size=32, output_bw=8, output_granularity="per_token")
NVFP4 = dict(param_format="nvfp4", output_format="nvfp4")


@pytest.fixture(scope="module")
def model():
    return gpt2()


def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return tf.LlamaForCausalLM(cfg).eval()


def test_gpt2_layer_inputs_are_exactly_the_inputs_of_its_linear_layers(model):
    """GPT-2's Conv1D runs ``addmm(bias, x, weight)``: ``x`` (argument 1) is the layer input."""
    sim = sim_of(model, activation_sites="layer_inputs", **W4G32A8)
    expected = [name for i in range(2) for name in (
        f"transformer.h.{i}.ln_1",  # -> attn.c_attn
        f"transformer.h.{i}.attn.sdpa_0.output",  # -> attn.c_proj (heads merged: data movement)
        f"transformer.h.{i}.ln_2",  # -> mlp.c_fc
        f"transformer.h.{i}.mlp.act.mul_3",  # GELU's last op -> mlp.c_proj
    )] + ["transformer.ln_f"]  # -> lm_head
    assert list(sim.activation_quantizers()) == expected
    everywhere = sim_of(model, **W4G32A8)
    assert set(expected) < set(everywhere.activation_quantizers())
    assert set(sim.quantized_params()) == set(everywhere.quantized_params())  # weights are not placement's
    text = sim.summary()
    assert "W4g32A8 per token at layer inputs;" in text
    # q/k/v come out of c_attn into the attention: float, and the summary says why
    assert "  transformer.h.0.attn.c_attn: not the input of a weighted layer (activation_sites='layer_inputs')" in text


def test_llama_layer_inputs_leave_norm_internals_rotary_and_residuals_float():
    m = llama()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    sims = {}
    for sites in ("outputs", "layer_inputs"):
        from orchestrator.quant import QuantizationSimModel

        sims[sites] = sim = QuantizationSimModel(m, ids, QuantConfig(activation_sites=sites, **NVFP4))
        sim.compute_encodings(lambda mm, _: mm(ids))
    expected = [name for i in range(2) for name in (
        f"model.layers.{i}.input_layernorm.mul_1",  # RMSNorm's weight * x -> q/k/v_proj
        f"model.layers.{i}.self_attn.sdpa_0.output",  # -> o_proj
        f"model.layers.{i}.post_attention_layernorm.mul_1",  # -> gate/up_proj
        f"model.layers.{i}.mlp.mul_0",  # act(gate) * up -> down_proj
    )] + ["model.norm.mul_1"]  # -> lm_head
    assert list(sims["layer_inputs"].activation_quantizers()) == expected
    every = sims["outputs"].activation_quantizers()
    assert "model.layers.0.self_attn.sdpa_0.probs" in every and "model.layers.0.self_attn.neg_0" in every
    # Fewer quantizers, less noise: FP4 only where a matmul with weights reads it.
    ref = m(ids).logits
    err = {k: sqnr_db(ref.detach().numpy(), s.model(ids).logits.detach().numpy()) for k, s in sims.items()}
    assert err["layer_inputs"] > err["outputs"], err


@pytest.mark.parametrize("preset", [W4G32A8, NVFP4], ids=["w4g32a8", "nvfp4"])
def test_layer_inputs_export_agrees_in_onnxruntime(model, preset, tmp_path):
    """The attention runs as ``F.scaled_dot_product_attention`` with its output quantized, and the
    QDQ graph puts the same quantizers on the same tensors."""
    sim = sim_of(model, activation_sites="layer_inputs", **preset)
    paths = sim.export(str(tmp_path), "m")
    batch = tokens(7)
    args, kwargs = numpy_inputs(batch)
    theirs = QdqRunner(paths["onnx"], paths["encodings"])(*args, **kwargs)
    with torch.no_grad():
        ours = logits_of(feed(sim.model, batch)).numpy()
    assert sqnr_db(ours, theirs) > 80, sqnr_db(ours, theirs)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_bad_activation_sites_is_one_line():
    with pytest.raises(QuantConfigError, match=r"^activation_sites='linear' is not allowed; allowed: outputs, "
                                               r"layer_inputs$"):
        QuantConfig(activation_sites="linear")


def test_trial_config_carries_activation_sites_into_the_simulation():
    from orchestrator.train.config import TrialConfig, TrialConfigError

    cfg = TrialConfig.from_dict({"quant": {"activation_sites": "layer_inputs"}})
    assert cfg.quant_config().activation_sites == "layer_inputs"
    with pytest.raises(TrialConfigError, match=r"^quant\.activation_sites='all' is not allowed; allowed: outputs, "
                                               r"layer_inputs$"):
        TrialConfig.from_dict({"quant": {"activation_sites": "all"}}).validate()


@pytest.mark.parametrize("preset,expected", [("w4g32a8", "layer_inputs"), ("w4g32a4", "layer_inputs"),
                                             ("fp8", "layer_inputs"), ("mxfp8", "layer_inputs"),
                                             ("mxfp4", "layer_inputs"), ("nvfp4", "layer_inputs"),
                                             ("w8a8", "outputs"), ("w4a4", "outputs")])
def test_presets_named_after_torchao_and_modelopt_use_their_placement(preset, expected):
    from helpers_sweep import hydra_app
    from omegaconf import OmegaConf

    from orchestrator.train.config import TrialConfig

    with hydra_app("train", (f"quant={preset}",)) as (_, master):
        quant = OmegaConf.to_container(master.quant, resolve=True)
    assert TrialConfig.from_dict({"quant": quant}).quant_config().activation_sites == expected


class _AttentionRnn(torch.nn.Module):
    """Linear -> ReLU -> self-attention (its projections run op by op) -> residual + LayerNorm -> LSTM -> head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = torch.nn.LayerNorm(16)
        self.rnn = torch.nn.LSTM(16, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        a, _ = self.attn(h, h, h)
        out, _ = self.rnn(self.norm(a + h))
        return self.head(out[:, -1])


def test_layer_inputs_of_attention_projections_and_recurrent_layers():
    from orchestrator.quant import QuantizationSimModel

    torch.manual_seed(0)
    model, x = _AttentionRnn().eval(), torch.randn(2, 5, 8)
    sim = QuantizationSimModel(model, x, QuantConfig(activation_sites="layer_inputs"))
    # x -> embed; relu -> the in-projections; the attention's probs @ v -> out_proj; the LayerNorm -> the
    # LSTM (a layer with weights); the LSTM's output (through the indexing) -> head. Left float: the
    # projections' own outputs, scores, softmax, the residual add.
    assert list(sim.activation_quantizers()) == ["x", "relu_0", "attn.matmul_1", "norm", "rnn.output_0"]
    sim.compute_encodings(lambda m, _: m(x))
    with torch.no_grad():
        assert sqnr_db(model(x).numpy(), sim.model(x).numpy()) > 25
