"""Issue 22's failure modes, each on a small module written to hit it: integer arithmetic is never
a site (nor counted, so ops a tracer adds do not shift the keys), a tensor used only as SDPA's
``attn_mask`` stays float, an op the exporter folds away (a ``cat`` with an empty cache) leaves
both quantizers applied (an Identity copy in the graph, noted in the summary), parameters the
exporter merges (equal zero tokens) or gathers (``table[index]``) get their encoding on the
initializer the graph consumes; and the outlier warning at calibration."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from quant_checks import calibrated
from torch import nn

from orchestrator.quant import OutlierWarning, QdqRunner, QuantConfig, QuantizationSimModel


def agrees_exactly(sim, paths, x) -> bool:
    with torch.no_grad():
        ours = sim.model.eval()(x).numpy()
    return np.array_equal(QdqRunner(paths["onnx"], paths["encodings"])(x.numpy()), ours)


class IntegerArithmetic(nn.Module):
    """Positions from a float mask: ``cumsum``/``mul``/``sub`` on floats that end in ``.long()``
    would be activations by dtype alone; the int ``add`` of the offset is never one."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        n = torch.arange(x.shape[1]) + 2  # integer: no site, not counted
        h = self.fc(x) + self.pos(n)  # the first float add: add_0
        return h * 2.0


def test_integer_ops_are_never_sites_and_not_counted(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(4, 5, 6) for _ in range(2)]
    sim = calibrated(IntegerArithmetic().eval(), xs)
    assert list(sim.activation_quantizers()) == ["x", "fc", "add_0", "mul_0"]
    assert "1 op call(s) on integer tensors only" in sim.summary()
    paths = sim.export(str(tmp_path), "m")
    assert agrees_exactly(sim, paths, xs[0])


class BiasedAttention(nn.Module):
    """T5-style: a learned position bias plus an additive padding mask, given as ``attn_mask``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.rel = nn.Embedding(9, 2)  # a layer's output: an activation by capture's rules
        self.register_buffer("buckets", torch.randint(0, 9, (25,)))

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(x.shape[0], 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        bias = self.rel(self.buckets).view(5, 5, 2).permute(2, 0, 1)[None]
        additive = torch.where(mask[:, None, None, :] > 0, 0.0, torch.finfo(x.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + additive)
        return out.transpose(1, 2).reshape(x.shape[0], 5, 8)


def test_attention_mask_plus_bias_stays_float():
    torch.manual_seed(0)
    mask = torch.ones(4, 5)
    mask[:, 3:] = 0
    sim = calibrated(BiasedAttention().eval(), [(torch.randn(4, 5, 8), mask)])
    names = list(sim.activation_quantizers())
    assert "add_0" not in names, names
    assert "add_0: attention mask/bias joining the scores inside the softmax of sdpa_0" in sim.summary()


class EmptyCache(nn.Module):
    """A KV-cache update: ``cat([empty cache, k])``, which the exporter folds into ``k``."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(6, 6)
        self.register_buffer("cache", torch.zeros(0, 6))

    def forward(self, x):
        k = self.k(x) * 0.5
        return torch.cat([self.cache.expand(x.shape[0], 0, 6), k], dim=1) + 1.0


def test_a_folded_op_keeps_both_quantizers(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(4, 5, 6) for _ in range(2)]
    sim = calibrated(EmptyCache().eval(), xs)
    assert {"mul_0", "cat_0"} <= set(sim.activation_quantizers())
    # A different grid on the cat makes the second QDQ visible in the result.
    sim.activation_quantizers()["cat_0"].set_range(torch.tensor([-0.7]), torch.tensor([0.9]))
    paths = sim.export(str(tmp_path), "m")
    assert agrees_exactly(sim, paths, xs[0])
    assert "cat_0: the exporter merged its tensor with mul_0's" in sim.summary()


class Tokens(nn.Module):
    """DeiT-like: two zero tokens and a zero-initialised position table beside zero biases."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 6))
        self.dist = nn.Parameter(torch.zeros(1, 1, 6))
        self.proj = nn.Linear(6, 6)
        nn.init.zeros_(self.proj.bias)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        b = x.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), self.dist.expand(b, -1, -1), self.proj(x)], dim=1)
        return self.norm(h).mean(1)


def test_equal_tokens_merged_by_the_exporter_keep_their_names(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(4, 5, 6) for _ in range(2)]
    sim = calibrated(Tokens().eval(), xs)
    paths = sim.export(str(tmp_path), "m")
    assert agrees_exactly(sim, paths, xs[0])
    import json

    names = {e["name"] for e in json.load(open(paths["encodings"]))["param_encodings"]}
    assert "cls" in names and "norm.bias" not in names and "proj.bias" not in names, names


class RelativeBias(nn.Module):
    """Swin-like: a bias table read through a constant index buffer, which the exporter folds."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(9, 2))
        self.register_buffer("index", torch.randint(0, 9, (16,)))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # x: [B, 2, 4, 4]
        bias = self.table[self.index].view(4, 4, 2).permute(2, 0, 1)
        return self.fc(x + bias)


def test_a_table_read_through_a_constant_index_is_encoded_where_gathered(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(4, 2, 4, 4) for _ in range(2)]
    sim = calibrated(RelativeBias().eval(), xs)
    assert "table" in sim.quantized_params()
    paths = sim.export(str(tmp_path), "m")
    assert agrees_exactly(sim, paths, xs[0])
    import json

    names = {e["name"] for e in json.load(open(paths["encodings"]))["param_encodings"]}
    assert "table.gathered" in names, names
    assert "table: read through a constant index" in sim.summary()


class Outlier(nn.Module):
    """One channel of the hidden state ~100x the others (an LLM's residual stream)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        gain = torch.ones(16)
        gain[3] = 100.0
        self.register_buffer("gain", gain)

    def forward(self, x):
        h = self.fc(x) * self.gain
        return self.head(h)


def test_outliers_warn_at_calibration_and_16_bits_fix_them():
    torch.manual_seed(0)
    model = Outlier().eval()
    xs = [torch.randn(64, 16) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = calibrated(model, xs)
    messages = [str(w.message) for w in caught if issubclass(w.category, OutlierWarning)]
    assert len(messages) == 1 and "mul_0" in messages[0] and "outlier_overrides" in messages[0], messages
    assert list(sim.low_sqnr_tensors) == ["mul_0"] and sim.tensor_sqnr["fc"] > 30.0
    fixed_cfg = dataclasses.replace(sim.config, overrides=sim.outlier_overrides())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixed = QuantizationSimModel(model, xs[0], fixed_cfg)
        fixed.compute_encodings(lambda m, b: [m(x) for x in b], xs)
    assert not [w for w in caught if issubclass(w.category, OutlierWarning)]
    assert fixed.tensor_sqnr["mul_0"] > sim.tensor_sqnr["mul_0"] + 40.0
    with warnings.catch_warnings(record=True) as caught:  # a 4-bit grid: < 20 dB for any tensor, no outlier signal
        warnings.simplefilter("always")
        low = QuantizationSimModel(model, xs[0], dataclasses.replace(sim.config, output_bw=4))
        low.compute_encodings(lambda m, b: [m(x) for x in b], xs)
    assert not [w for w in caught if issubclass(w.category, OutlierWarning)] and low.tensor_sqnr["fc"] < 30.0


@pytest.mark.parametrize("bad", [0, 1, 17])
def test_outlier_overrides_bitwidth_is_checked(bad):
    torch.manual_seed(0)
    sim = calibrated(Outlier().eval(), [torch.randn(8, 16)])
    with pytest.raises(Exception, match="bit width"):
        QuantConfig(overrides=sim.outlier_overrides(bad) or {"x": {"bitwidth": bad}})
