"""Absorbable LoRA on a simulation's quantized Linear weights (``quant/lora.py``) on a tiny
``LlamaForCausalLM``: the weight quantizer sees ``W + (alpha/r) B @ A``; only adapters and
encodings get gradients; merging (and so the export) gives bit for bit the adapter model's
outputs, and the exported ONNX (no adapter in it) agrees with it in onnxruntime."""

from __future__ import annotations

import onnx
import pytest
import torch
from tiny_hf_models import make_llama

from orchestrator.quant import (QuantConfig, QuantConfigError, QuantizationSimModel, add_lora, export_agreement,
                                merge_lora)
from orchestrator.quant.build import is_quantizer_key
from orchestrator.quant.lora import lora_adapters, lora_candidates

W4G32_LEARNED = QuantConfig(param_bw=4, param_block_size=32, output_bw=8, output_granularity="per_token",
                            range_learning=True, learn_weight_encodings=True)


def _calibrated_sim(config: QuantConfig = W4G32_LEARNED):
    model, tokens = make_llama()
    sim = QuantizationSimModel(model, tokens(2, 0), config)
    sim.compute_encodings(lambda m, batches: [m(**b) for b in batches], [tokens(4, s) for s in range(2)])
    return sim, tokens


def _train_adapters(sim, tokens, steps: int = 3) -> None:
    """A few Adam steps on the adapters and encodings, so B is no longer zero."""
    params = [p for p in sim.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    sim.model.train()
    for s in range(steps):
        batch = tokens(4, 10 + s)
        loss = sim.model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    sim.model.eval()


def test_adapters_start_at_the_calibrated_model_and_only_they_and_the_encodings_get_gradients():
    sim, tokens = _calibrated_sim()
    batch = tokens(4, 5)
    with torch.no_grad():
        before = sim.model(**batch).logits
    adapters = add_lora(sim, rank=4, alpha=8.0)
    # every Linear of the decoder and the untied head; the embedding is not a Linear
    assert set(adapters) == set(lora_candidates(sim)) and "lm_head" in adapters and len(adapters) == 8
    assert adapters["model.layers.0.mlp.up_proj"].A.shape == (4, 32)
    assert adapters["model.layers.0.mlp.up_proj"].B.shape == (64, 4)
    with torch.no_grad():
        assert torch.equal(sim.model(**batch).logits, before)  # B = 0: W + 0 is W, bit for bit
    sim.model.train()
    sim.model(**batch, labels=batch["input_ids"]).loss.backward()
    with_grad = {n for n, p in sim.model.named_parameters() if p.grad is not None}
    lora = {n for n in with_grad if ".lora_adapters." in n}
    assert lora and with_grad - lora and all(is_quantizer_key(n) for n in with_grad - lora)
    assert len(lora) == 2 * len(adapters)  # A and B of every adapter (A's is zero while B is)
    assert all(p.grad.abs().sum() > 0 for n, p in sim.model.named_parameters() if n.endswith("lora_adapters.weight.B"))
    frozen = [n for n, p in sim.model.named_parameters() if not p.requires_grad]
    assert "model.layers.0.mlp.up_proj.weight" in frozen and "model.norm.weight" in frozen
    assert "model.embed_tokens.weight" in frozen


def test_merged_export_computes_what_the_adapter_model_computed(tmp_path):
    sim, tokens = _calibrated_sim()
    batch = tokens(4, 5)
    with torch.no_grad():
        base = sim.model(**batch).logits
    add_lora(sim, rank=4, alpha=8.0, targets=["*.mlp.*", "*q_proj"])
    assert len(lora_adapters(sim)) == 4  # gate/up/down + q_proj of the one layer
    _train_adapters(sim, tokens)
    with torch.no_grad():
        adapted = sim.model(**batch).logits
        assert not torch.equal(adapted, base)  # the adapters changed the model
        weight = sim.model.model.layers[0].mlp.up_proj.weight
        effective = lora_adapters(sim)["model.layers.0.mlp.up_proj"](weight).clone()
    assert merge_lora(sim) == 4 and not lora_adapters(sim)
    with torch.no_grad():
        assert torch.equal(sim.model.model.layers[0].mlp.up_proj.weight, effective)
        assert torch.equal(sim.model(**batch).logits, adapted)  # merged = adapter model, bit for bit
    paths = sim.export(str(tmp_path), "m")
    graph = onnx.load(paths["onnx"]).graph
    assert not [n for n in [*(i.name for i in graph.initializer), *(v.name for v in graph.node)] if "lora" in n]
    state = torch.load(paths["pth"], weights_only=True)
    assert not [k for k in state if "lora" in k]
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], effective)
    agreement = export_agreement(sim, paths, [tokens(4, 7)])
    assert agreement.top1 == 1.0 and agreement.problem(60.0) is None, agreement


def test_export_merges_adapters_itself(tmp_path):
    sim, tokens = _calibrated_sim(QuantConfig(param_bw=2, param_block_size=32, quantize_activations=False))
    add_lora(sim, rank=2, alpha=4.0)
    _train_adapters(sim, tokens, steps=2)
    batch = tokens(4, 5)
    with torch.no_grad():
        adapted = sim.model(**batch).logits
    paths = sim.export(str(tmp_path), "m")  # merges first
    assert not lora_adapters(sim)
    with torch.no_grad():
        assert torch.equal(sim.model(**batch).logits, adapted)
    assert export_agreement(sim, paths, [batch]).problem(60.0) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, r"^lora\.rank=0 is not allowed; allowed: an integer >= 1$"),
    ({"rank": 4, "alpha": -1.0}, r"^lora\.alpha=-1\.0 is not allowed; allowed: a finite number > 0$"),
    ({"rank": 4, "targets": ["*.mlp.*", "*.nope"]},
     r"^lora\.targets pattern '\*\.nope' matches no quantized Linear layer; allowed: fnmatch patterns of their "
     r"names: model\.layers\.0\.self_attn\.q_proj, .*, \.\.\.$"),
])
def test_bad_lora_arguments_are_one_line_errors(kwargs, message):
    sim, _ = _calibrated_sim()
    with pytest.raises(QuantConfigError, match=message) as err:
        add_lora(sim, **{"alpha": 8.0, **kwargs})
    assert "\n" not in str(err.value)
    assert not lora_adapters(sim)


def test_a_weight_another_module_also_quantizes_gets_no_adapter():
    """MHA's ``out_proj.weight`` is applied by the attention's own code (``qparam`` of the MHA layer),
    not by its ``out_proj`` Linear: an adapter there would not reach the forward."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.att(x, x, x)[0])

    sim = QuantizationSimModel(Block(), torch.randn(2, 5, 16), QuantConfig())
    assert "att.out_proj.weight" in sim.quantized_params()
    assert list(lora_candidates(sim)) == ["fc"]
    with pytest.raises(QuantConfigError, match=r"pattern 'att\.\*' matches no quantized Linear layer; .*: fc$"):
        add_lora(sim, rank=2, alpha=2.0, targets=["att.*"])


@pytest.mark.slow
def test_lora_compiles_to_one_graph_with_the_eager_numbers():
    """``torch.compile(sim.model)`` with trained adapters (W4 g32 learned blocks, per-token activations):
    one graph without a break; loss and gradients as eager's up to float rounding (measured: 5e-7
    relative, the worst an encoding's gradient). (Not bit for bit:
    inductor fuses the Llama's RMSNorm and rotary embedding, whose outputs differ from eager's in the
    last bit with or without adapters; a quantizer can carry such a bit across a rounding boundary.)"""
    torch._dynamo.reset()
    sim, tokens = _calibrated_sim()
    add_lora(sim, rank=4, alpha=8.0)
    _train_adapters(sim, tokens)
    batch = tokens(4, 20)
    explained = torch._dynamo.explain(sim.model)(**batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    def run(model):
        sim.model.zero_grad(set_to_none=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in sim.model.named_parameters() if p.grad is not None}

    eager_loss, eager = run(sim.model)
    compiled_loss, compiled = run(torch.compile(sim.model, fullgraph=True))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0.0)
    assert set(compiled) == set(eager) and any(".lora_adapters." in n for n in eager)
    floor = 1e-6 * max(g.norm() for g in eager.values())
    errors = {n: float((compiled[n] - g).norm() / max(g.norm(), floor)) for n, g in eager.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: compiled gradient differs from eager by {errors[worst]:.2e} (relative)"
