"""Two-level block formats (LPBQ, MX, NVFP4) against numpy oracles written from their definitions
(AIMET's LPBQ, OCP MX v1.0 section 6.3, NVIDIA/torchao's NVFP4), not from the code: element grids
enumerated from (exponent, mantissa, bias) with ties to the even code; exact ties, saturation,
subnormals, block boundaries, one block per row when the dim is smaller than the block, a partial
last block rejected. Then torchao's own ``to_mx``/``nvfp4_quantize`` where torchao is importable
(an optional oracle: skipped without it), config errors, both QAT modes, and compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics_reference import float_grid, nearest_float
from quant_checks import assert_compiles_like_eager

from orchestrator.quant import QuantConfig, QuantizeDequantize
from orchestrator.quant.block_formats import BLOCK_FORMATS
from orchestrator.quant.errors import QuantConfigError
from orchestrator.quant.formats import FORMATS

# ---------------------------------------------------------------------------- numpy oracles


EMAX = {"float8_e4m3fn": 8, "float8_e5m2": 15, "float4_e2m1": 2, "int8": 0}  # OCP MX table: largest normal's exponent


def mx_oracle(w: np.ndarray, element: str, block: int = 32) -> np.ndarray:
    """OCP MX: X = floor(log2(amax)) - emax per block, clamped to E8M0's [-127, 127]; elements
    x / 2^X quantized to the element format (MXINT8: k * 2^-6, k in [-128, 127])."""
    rows, cols = w.shape
    v = w.reshape(rows, cols // block, block).astype(np.float32)
    amax = np.abs(v).max(axis=-1, keepdims=True).astype(np.float64)
    exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))), -127)
    x = np.clip(exp - EMAX[element], -127, 127)
    scale = 2.0 ** x
    u = v / scale  # exact: a power of two
    if element == "int8":
        c = np.clip(np.round(u * 64), -128, 127) / 64
    else:
        c = nearest_float(u, element)
    return (c * scale).astype(np.float32).reshape(rows, cols)


def nvfp4_oracle(w: np.ndarray, block: int = 16) -> np.ndarray:
    """NVFP4 in float32 steps: s_t = amax / (448 * 6); q = e4m3(clip(amax_b / 6 / s_t, 2^-6, 448));
    elements e2m1(clip(x / (s_t * q), -6, 6))."""
    f32 = np.float32
    rows, cols = w.shape
    v = w.reshape(rows, cols // block, block).astype(f32)
    s_t = f32(np.abs(v).max()) / f32(448.0 * 6.0)
    amax = np.abs(v).max(axis=-1, keepdims=True)
    q = nearest_float(np.clip(amax / f32(6.0) / s_t, 2.0**-6, 448.0).astype(f32), "float8_e4m3fn").astype(f32)
    total = (s_t * q).astype(f32)
    return (nearest_float((v / total).astype(f32), "float4_e2m1") * total).astype(f32).reshape(rows, cols)


def lpbq_oracle(w: np.ndarray, block: int, bits: int = 4) -> np.ndarray:
    """AIMET's LPBQ (block_grouping -1) over the symmetric per-block scale of ``encoding.py``,
    raw = max(max_b / (2^(b-1) - 1), -min_b / 2^(b-1)); s_c = max_b raw / 2^b;
    i = clip(round(raw / s_c), 1, 2^b); elements clip(round(x / (i s_c)), -2^(b-1), 2^(b-1) - 1)."""
    f32 = np.float32
    rows, cols = w.shape
    v = w.reshape(rows, cols // block, block).astype(f32)
    half = 1 << (bits - 1)
    raw = np.maximum(v.max(axis=-1, keepdims=True) / f32(half - 1), v.min(axis=-1, keepdims=True) / f32(-half))
    raw = np.maximum(raw, np.finfo(f32).eps)
    s_c = raw.max(axis=1, keepdims=True) / f32(1 << bits)
    ints = np.clip(np.round(raw / s_c), 1, 1 << bits)
    s = (ints * s_c).astype(f32)
    return (np.clip(np.round(v / s), -half, half - 1) * s).astype(f32).reshape(rows, cols)


def probe_weight(element: str, rows: int = 6, block: int = 32, seed: int = 0) -> np.ndarray:
    """Blocks of very different magnitudes (block boundaries matter), each holding its amax, exact
    grid midpoints (ties) under the block's scale, values that saturate, and subnormal elements."""
    rng = np.random.default_rng(seed)
    w = np.zeros((rows, 4 * block), np.float32)
    for r in range(rows):
        for b in range(4):
            mag = 2.0 ** rng.integers(-20, 12)
            v = rng.standard_normal(block) * mag
            if element in FORMATS:  # ties and subnormals on the element grid of an MX scale 2^X
                g = float_grid(element)
                x = np.floor(np.log2(np.abs(v).max())) - EMAX[element]
                mids = (g[1:] + g[:-1]) / 2
                v[: block // 4] = rng.choice(mids, block // 4) * rng.choice([-1, 1], block // 4) * 2.0 ** x
                v[block // 4: block // 4 + 2] = g[1] / 3 * 2.0 ** x  # below the smallest subnormal
            w[r, b * block:(b + 1) * block] = v
    w[0, 5] = w[0, :32].max() * 1.0  # a repeated maximum
    return w


def sim_weight(fmt_name: str, w: np.ndarray, bits: int = 4, block_size: int = 0) -> tuple[np.ndarray, object]:
    bf = BLOCK_FORMATS[fmt_name]
    t = torch.from_numpy(w)
    q = QuantizeDequantize("w", bits, True, channels=w.shape[0], axis=0, follow=True, fmt=bf.element_format(bits),
                           granularity=bf.granularity_for(0, 1, block_size, bits), shape=tuple(w.shape))
    return q(t).numpy(), q


# ---------------------------------------------------------------------------- math
@pytest.mark.parametrize("name,element", [("mxfp8", "float8_e4m3fn"), ("mxfp8_e5m2", "float8_e5m2"),
                                          ("mxfp4", "float4_e2m1"), ("mxint8", "int8")])
def test_mx_matches_the_ocp_oracle(name, element):
    w = probe_weight(element)
    ours, q = sim_weight(name, w)
    expected = mx_oracle(w, element)
    bad = np.flatnonzero(ours != expected)
    assert bad.size == 0, (w.reshape(-1)[bad[:5]], ours.reshape(-1)[bad[:5]], expected.reshape(-1)[bad[:5]])
    scale = q.encoding(torch.from_numpy(w)).scale.numpy()
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))  # powers of two (E8M0)
    if element != "int8":  # the MX rule lets the block maximum reach beyond the element's max: saturated
        u = np.abs(w.reshape(6, 4, 32)) / scale[..., None]
        assert (u > FORMATS[element].max).any()


def test_mx_scale_exponents_clamp_to_e8m0_and_an_all_zero_block_is_zero():
    w = np.zeros((2, 64), np.float32)
    w[0, :32] = 1e-42  # float32 subnormals: floor(log2) - 8 < -127
    w[1, 32:] = 3.0e38
    ours, q = sim_weight("mxfp8", w)
    e = q.encoding(torch.from_numpy(w))
    assert e.inner.tolist() == [[-127.0, -127.0], [-127.0, 127.0 - 8]]
    np.testing.assert_array_equal(ours, mx_oracle(w, "float8_e4m3fn"))
    assert ours[1, :32].tolist() == [0.0] * 32


def test_nvfp4_matches_the_two_level_oracle():
    w = probe_weight("float4_e2m1", rows=5, block=16, seed=3)
    ours, q = sim_weight("nvfp4", w)
    np.testing.assert_array_equal(ours, nvfp4_oracle(w))
    e = q.encoding(torch.from_numpy(w))
    assert e.scale.shape == (5, 4) and e.outer.numel() == 1
    assert torch.equal(e.inner.to(torch.float8_e4m3fn).float(), e.inner)  # block scales are e4m3 values
    torch.testing.assert_close(e.scale, e.outer * e.inner, rtol=0, atol=0)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_lpbq_matches_aimets_definition(block):
    w = np.random.default_rng(block).standard_normal((7, 128)).astype(np.float32)
    w[:, :block] *= 20.0  # one large block per row: the others get small integer scales
    ours, q = sim_weight("lpbq", w, bits=4, block_size=block)
    np.testing.assert_array_equal(ours, lpbq_oracle(w, block))
    e = q.encoding(torch.from_numpy(w))
    assert e.scheme == "lpbq" and e.scale_bitwidth == 4 and e.outer.shape == (7, 1)
    assert e.inner.min() >= 1 and e.inner.max() == 16 and torch.equal(e.inner, e.inner.round())
    assert torch.equal(e.scale, e.inner * e.outer)


def test_a_dim_smaller_than_the_block_is_one_block_and_a_partial_block_is_rejected():
    w = probe_weight("float4_e2m1", rows=3, block=4)[:, :16]  # 16 inputs < 32: one MX block per row
    ours, _ = sim_weight("mxfp4", w)
    np.testing.assert_array_equal(ours, mx_oracle(w, "float4_e2m1", block=16))
    with pytest.raises(ValueError, match="dim 1 of size 48 is not a multiple of block_size=32"):
        BLOCK_FORMATS["mxfp4"].granularity_for(0, 1, 0, 4).scale_shape((4, 48))


# ---------------------------------------------------------------------------- torchao, where importable
def test_mx_and_nvfp4_equal_torchao_bit_for_bit():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4

    w = torch.from_numpy(probe_weight("float8_e4m3fn", rows=4, seed=5))
    scale, data = mx.to_mx(w, torch.float8_e4m3fn, 32)
    theirs = (data.float().reshape(4, 4, 32) * scale.float().reshape(4, 4, 1)).reshape(4, 128)
    assert torch.equal(torch.from_numpy(sim_weight("mxfp8", w.numpy())[0]), theirs)

    w4 = torch.from_numpy(probe_weight("float4_e2m1", rows=4, seed=6))
    scale, data = mx.to_mx(w4, torch.float4_e2m1fn_x2, 32)
    values = f4_unpacked_to_f32(unpack_uint4(data.view(torch.uint8))).reshape(4, 4, 32)
    theirs = (values * scale.float().reshape(4, 4, 1)).reshape(4, 128)
    assert torch.equal(torch.from_numpy(sim_weight("mxfp4", w4.numpy())[0]), theirs)

    tensor_scale = nv.per_tensor_amax_to_scale(w4.abs().max())
    block_scales, data = nv.nvfp4_quantize(w4, 16, tensor_scale)
    values = f4_unpacked_to_f32(unpack_uint4(data.view(torch.uint8))).reshape(4, 8, 16)
    theirs = (values * (tensor_scale * block_scales.float()).reshape(4, 8, 1)).reshape(4, 128)
    assert torch.equal(torch.from_numpy(sim_weight("nvfp4", w4.numpy())[0]), theirs)


# ---------------------------------------------------------------------------- dynamic activations
ELEMENT = {"mxfp8": "float8_e4m3fn", "mxfp8_e5m2": "float8_e5m2", "mxfp4": "float4_e2m1", "mxint8": "int8",
           "nvfp4": "float4_e2m1"}


def sim_activation(fmt_name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` through a dynamic activation quantizer of block format ``fmt_name`` (as the sim builds it)."""
    bf = BLOCK_FORMATS[fmt_name]
    q = QuantizeDequantize("a", 8, False, fmt=bf.element_format(8), granularity=bf.activation_granularity())
    assert q.dynamic and not q.needs_calibration
    return q(x)


def activation_oracle(fmt_name: str, x: np.ndarray) -> np.ndarray:
    """The weight oracles on the activation's rows ``[-1, K]`` (blocks along the last dim), a partial
    last block zero-padded first (OCP MX's padding) and cut off after."""
    k = x.shape[-1]
    block = BLOCK_FORMATS[fmt_name].block_size
    rows = np.pad(x.reshape(-1, k), ((0, 0), (0, -k % block)))
    out = nvfp4_oracle(rows) if fmt_name == "nvfp4" else mx_oracle(rows, ELEMENT[fmt_name])
    return out[:, :k].reshape(x.shape)


@pytest.mark.parametrize("fmt_name", list(ELEMENT))
def test_dynamic_block_activations_match_the_oracles_per_call(fmt_name):
    """Each call scales each block of the last dim from its own values (ties, saturation and
    subnormals from the probe; tokens of very different magnitudes), for 3-D activations and for a
    last dim of 40 (a partial block, zero-padded); a second batch gets its own scales."""
    probe = probe_weight(ELEMENT[fmt_name], rows=6, block=16 if fmt_name == "nvfp4" else 32, seed=3)
    x = torch.from_numpy(probe.reshape(2, 3, -1))
    np.testing.assert_array_equal(sim_activation(fmt_name, x).numpy(), activation_oracle(fmt_name, x.numpy()))
    partial = torch.from_numpy(probe[:, :40].copy())
    np.testing.assert_array_equal(sim_activation(fmt_name, partial).numpy(),
                                  activation_oracle(fmt_name, partial.numpy()))
    scaled = x * 1024.0  # dynamic: a power-of-two scaling of the input scales the output exactly
    np.testing.assert_array_equal(sim_activation(fmt_name, scaled).numpy(), sim_activation(fmt_name, x).numpy() * 1024)


def test_a_partial_last_block_quantizes_as_its_zero_padding_does_gradients_included():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    padded = torch.cat([x, torch.zeros(5, 24)], dim=1)
    for fmt_name in ("mxfp4", "nvfp4"):
        a, b = x.clone().requires_grad_(), padded.clone().requires_grad_()
        out_a, out_b = sim_activation(fmt_name, a), sim_activation(fmt_name, b)
        assert torch.equal(out_a, out_b[:, :40])
        (out_a * torch.arange(40.0)).sum().backward()
        (out_b[:, :40] * torch.arange(40.0)).sum().backward()
        assert torch.equal(a.grad, b.grad[:, :40])  # the STE mask: saturated elements get no gradient
        assert 0 < int((a.grad == 0).sum()) < a.numel() // 4 or fmt_name == "nvfp4"


def test_dynamic_mx_activations_equal_torchao():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    x = torch.from_numpy(probe_weight("float8_e4m3fn", rows=4, seed=8)).reshape(2, 2, 128)
    scale, data = mx.to_mx(x.reshape(4, 128), torch.float8_e4m3fn, 32)
    theirs = (data.float().reshape(4, 4, 32) * scale.float().reshape(4, 4, 1)).reshape(2, 2, 128)
    assert torch.equal(sim_activation("mxfp8", x), theirs)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,message", [
    (dict(param_format="mxfp4", range_learning=True, learn_weight_encodings=True),
     "param_format='mxfp4' with learn_weight_encodings=True: its block scales are derived from the weights"),
    (dict(param_format="nvfp4", param_quant_scheme="sqnr"),
     "param_format='nvfp4' with param_quant_scheme='sqnr'"),
    (dict(param_format="mxfp8", param_block_size=64), "param_format='mxfp8' has blocks of 32 by definition, not 64"),
    (dict(param_format="lpbq"), "param_format='lpbq' needs a block size"),
    (dict(param_format="mxfp4", per_channel=False), "param_format='mxfp4' needs per_channel=True"),
    (dict(output_format="lpbq"), r"output_format='lpbq' is not a known format \(LPBQ is for weights\)"),
])
def test_block_format_settings_that_make_no_sense_are_one_line_errors(kwargs, message):
    with pytest.raises(QuantConfigError, match=message) as info:
        QuantConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_an_override_may_set_a_block_format_by_name_and_lpbq_not_on_activations():
    cfg = QuantConfig(overrides={"*.mlp.*": {"format": "nvfp4"}})
    assert cfg.quantizer_settings("h.mlp.fc.weight", is_param=True).format == "nvfp4"
    assert cfg.quantizer_settings("h.mlp.fc", is_param=False).format == "nvfp4"  # dynamic NVFP4 blocks
    with pytest.raises(QuantConfigError, match="format 'lpbq' for activation 'h.mlp.fc': LPBQ is for weights"):
        QuantConfig(overrides={"*.mlp.*": {"format": "lpbq"}}).quantizer_settings(
            "h.mlp.fc", is_param=False)
    with pytest.raises(QuantConfigError, match="format 'mxfp4' for 'fc.weight' with granularity 'per_tensor': its "
                                               "blocks are per output channel"):
        QuantConfig(overrides={"fc.*": {"format": "mxfp4", "granularity": "per_tensor"}}).quantizer_settings(
            "fc.weight", is_param=True)
    with pytest.raises(QuantConfigError, match="with learn_weight_encodings=True"):
        QuantConfig(range_learning=True, learn_weight_encodings=True,
                    overrides={"*": {"format": "mxfp8"}}).quantizer_settings("fc.weight", is_param=True)


# ---------------------------------------------------------------------------- QAT modes
@pytest.mark.parametrize("name", ["lpbq", "mxfp4", "nvfp4"])
def test_block_scales_follow_the_weights_per_block(name):
    w = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    _, q = sim_weight(name, w, block_size=32)
    before = q.encoding(torch.from_numpy(w)).scale
    w2 = w.copy()
    w2[:, 32:64] *= 4.0 if name != "nvfp4" else 1.0  # NVFP4: the tensor maximum moves every scale
    w2[:, :16] *= 4.0 if name == "nvfp4" else 1.0
    after = q.encoding(torch.from_numpy(w2)).scale
    assert not torch.equal(before, after)
    if name == "mxfp4":
        torch.testing.assert_close(after[:, 1], before[:, 1] * 4, rtol=0, atol=0)
        assert torch.equal(after[:, [0, 2, 3]], before[:, [0, 2, 3]])


def test_learned_lpbq_trains_the_channel_scale_under_fixed_integer_block_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    bf = BLOCK_FORMATS["lpbq"]
    q = QuantizeDequantize("w", 4, True, channels=8, axis=0, learnable=True, is_param=True, fmt=bf.element_format(4),
                           granularity=bf.granularity_for(0, 1, 64, 4), shape=(8, 128))
    blocks = w.reshape(8, 2, 64)
    q.set_range(blocks.amin(-1).reshape(-1), blocks.amax(-1).reshape(-1))
    follow = QuantizeDequantize("w", 4, True, channels=8, axis=0, follow=True, fmt=bf.element_format(4),
                                granularity=bf.granularity_for(0, 1, 64, 4), shape=(8, 128)).encoding(w)
    # calibrated: the follow-the-weights encoding (the learned scale is exp(log s_c): within an ulp or two)
    assert torch.equal(q.block_int, follow.inner)
    torch.testing.assert_close(q.encoding().scale, follow.scale, rtol=1e-6, atol=0)
    ints = q.block_int.clone()
    opt = torch.optim.Adam([q.log_scale], lr=1e-2)
    target = w * 0.9
    for _ in range(3):
        opt.zero_grad()
        (q(w) - target).square().sum().backward()
        assert q.log_scale.grad.shape == (8, 1) and q.log_scale.grad.abs().sum() > 0
        opt.step()
    assert torch.equal(q.block_int, ints)
    e = q.encoding()
    assert torch.equal(e.scale, e.outer * e.inner) and torch.equal(e.inner, ints)


# ---------------------------------------------------------------------------- compile
@pytest.mark.parametrize("name", list(BLOCK_FORMATS))
def test_each_block_format_compiles_to_one_graph_equal_to_eager(name):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    _, q = sim_weight(name, w.numpy(), block_size=64)
    assert_compiles_like_eager(q, w, quantize_ops=1)


def test_learned_lpbq_compiles_to_one_graph_with_one_quantize_op():
    torch._dynamo.reset()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    bf = BLOCK_FORMATS["lpbq"]
    q = QuantizeDequantize("w", 4, True, channels=64, axis=0, learnable=True, is_param=True, fmt=bf.element_format(4),
                           granularity=bf.granularity_for(0, 1, 64, 4), shape=(64, 128))
    blocks = w.reshape(64, 2, 64)
    q.set_range(blocks.amin(-1).reshape(-1), blocks.amax(-1).reshape(-1))
    explained = torch._dynamo.explain(q)(w)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ops = [n for g in explained.graphs for n in g.graph.nodes if "quantize_dequantize" in str(n.target)]
    assert len(ops) == 1
    compiled = torch.compile(q, fullgraph=True)
    eager, comp = q(w), compiled(w)
    assert torch.equal(eager, comp)
    g = torch.randn_like(eager)
    (ge,) = torch.autograd.grad(eager, q.log_scale, g)
    (gc,) = torch.autograd.grad(comp, q.log_scale, g)
    torch.testing.assert_close(ge, gc, rtol=1e-4, atol=0)  # compiled sums reduce in another order
    torch._dynamo.reset()
