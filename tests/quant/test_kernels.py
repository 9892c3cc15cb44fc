"""The fused op ``qat::quantize_dequantize`` on every backend present: the C++ kernel, the ATen-ops
kernels (``kernels/aten.py``: the reference's own math, for devices without a kernel and machines
without a compiler), and the Triton kernel (run by Triton's interpreter on CPU tensors where there is
no GPU). Each against a numpy oracle of the contract (``s * clamp(round(x / s), o, o + qmax)``, true
float32 division, ties to even, the clipped STE, the LSQ/LSQ+ encoding gradients) and bit for bit
against ``reference.py``, in the reference's scale layout at every granularity."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from orchestrator.quant import kernels, reference
from orchestrator.quant.fake_quant import fake_quantize
from orchestrator.quant.formats import IntFormat
from orchestrator.quant.granularity import scale_runs
from orchestrator.quant.kernels import aten

# (x shape, scale shape): the layouts the quantizers use, and ones whose scale-indexed dims are not one run
CASES = {
    "per tensor": ((5000,), (1,)),
    "per tensor 4-D": ((64, 3, 7, 7), (1, 1, 1, 1)),
    "per channel axis 0": ((64, 3, 7, 7), (64, 1, 1, 1)),
    "per channel axis 1": ((8, 16, 5, 5), (1, 16, 1, 1)),
    "per channel last axis": ((4, 6, 33), (1, 1, 33)),
    "per channel 2-D axis 1": ((33, 17), (1, 17)),
    "per channel 1-D": ((7,), (7,)),
    "blocks along the last dim": ((16, 128), (16, 4)),
    "blocks along axis 1 of a conv weight": ((8, 64, 3, 3), (8, 2, 1, 1)),
    "per token 3-D": ((2, 6, 24), (2, 6, 1)),
    "blocks along axis 0 (HF Conv1D [K, C])": ((64, 8), (2, 8)),  # not one run
    "blocks on two axes": ((6, 64), (2, 4)),  # not one run
}
BITS = (2, 4, 8, 16)


def expand(t: np.ndarray, shape) -> np.ndarray:
    """A scale-layout array repeated over its blocks to ``shape`` (one element: broadcast)."""
    if t.size == 1:
        return np.broadcast_to(t.reshape(()), shape)
    for d, n in enumerate(shape):
        t = np.repeat(t, n // t.shape[d], axis=d)
    return t


def block_index(shape, scale_shape) -> np.ndarray:
    """For each element of ``x``, the flat index of its scale element."""
    if int(np.prod(scale_shape)) == 1:
        return np.zeros(shape, dtype=np.int64)
    idx = np.indices(shape)
    blocks = [idx[d] // (shape[d] // scale_shape[d]) for d in range(len(shape))]
    return np.ravel_multi_index(blocks, scale_shape)


def case_tensors(shape, scale_shape, bitwidth, seed=0, dyadic=False):
    """``x`` with exact .5 ties under power-of-two scales (half of the scale elements), values clipped
    at both ends, plus ``scale``/``offset`` in the reference layout. ``dyadic``: every scale a power of
    two and every ``x / s`` a quarter, so every sum of the gradients is exact in any order."""
    gen = torch.Generator().manual_seed(seed)
    qmax = 2**bitwidth - 1
    scale = torch.rand(scale_shape, generator=gen) * 0.1 + 0.01
    pow2 = 2.0 ** torch.randint(-7, -3, scale_shape, generator=gen).float()
    scale = torch.where((torch.rand(scale_shape, generator=gen) < 0.5) | dyadic, pow2, scale)
    offset = torch.randint(-qmax, 1, scale_shape, generator=gen).float()
    s_full = torch.from_numpy(expand(scale.numpy(), shape).copy())
    o_full = torch.from_numpy(expand(offset.numpy(), shape).copy())
    k = torch.randint(-6, qmax + 6, shape, generator=gen).float() + o_full
    if dyadic:
        x = (k + torch.randint(0, 4, shape, generator=gen).float() / 4) * s_full
    else:
        ties = (k + 0.5) * s_full
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, ties, torch.randn(shape, generator=gen) * qmax * s_full)
    return x, scale, offset, qmax


def oracle(x, scale, offset, qmax):
    """The contract in numpy float32: true division, np.round (ties to even), clamp, multiply."""
    s, o = expand(scale.numpy(), x.shape), expand(offset.numpy(), x.shape)
    r = np.round(x.numpy() / s)
    return (np.clip(r, o, o + qmax) * s).astype(np.float32), r


def oracle_grads(grad, x, scale, offset, qmax, gf):
    """Clipped-STE input gradient and the LSQ/LSQ+ encoding gradients per scale element (float64 sums)."""
    _, r = oracle(x, scale, offset, qmax)
    s, o = expand(scale.numpy(), x.shape), expand(offset.numpy(), x.shape)
    u = (x.numpy() / s).astype(np.float64)  # x / s in float32, as the contract divides
    c = np.clip(r, o, o + qmax)
    inside = (r >= o) & (r <= o + qmax)
    g = grad.numpy().astype(np.float64)
    gx = np.where(inside, grad.numpy(), 0.0).astype(np.float32)
    idx = block_index(tuple(x.shape), tuple(scale.shape)).ravel()
    n = scale.numel()
    gs = np.bincount(idx, (g * c - np.where(inside, g * u, 0.0)).ravel(), n) * gf
    go = np.bincount(idx, np.where(inside, 0.0, g).ravel(), n) * scale.numpy().astype(np.float64).ravel() * gf
    return gx, gs.reshape(scale.shape), go.reshape(scale.shape)


def close(a: torch.Tensor, b: np.ndarray) -> bool:
    return np.allclose(a.numpy(), b, rtol=1e-4, atol=1e-5 * (np.abs(b).max() + 1e-12))


def test_the_cpp_kernel_is_built_on_a_machine_with_a_compiler():
    assert kernels.backend() == "cpp"


def test_the_common_layouts_are_one_run_and_the_others_are_not():
    runs = {name: scale_runs(*case) for name, case in CASES.items()}
    assert runs["per tensor 4-D"] == (1, 1, 64 * 3 * 49)
    assert runs["per channel axis 1"] == (8, 16, 25)
    assert runs["blocks along the last dim"] == (1, 64, 32)
    assert runs["blocks along axis 1 of a conv weight"] == (1, 16, 32 * 9)
    assert runs["per token 3-D"] == (1, 12, 24)
    assert runs["blocks along axis 0 (HF Conv1D [K, C])"] is None and runs["blocks on two axes"] is None


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bitwidth", BITS)
def test_forward_is_bit_exact_with_the_contract_on_every_backend(name, bitwidth):
    x, scale, offset, qmax = case_tensors(*CASES[name], bitwidth)
    expected, _ = oracle(x, scale, offset, qmax)
    ref = reference.quantize_dequantize(x, scale, offset, IntFormat(bitwidth, True)).numpy()
    assert np.array_equal(ref, expected), f"reference: {np.sum(ref != expected)} element(s) differ"
    for backend, y in {"C++ kernel": fake_quantize(x, scale, offset, qmax),
                       "ATen ops": aten.forward(x, scale, offset, qmax, 1.0)}.items():
        assert np.array_equal(y.numpy(), expected), f"{backend}: {np.sum(y.numpy() != expected)} element(s) differ"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bitwidth", (4, 8, 16))
def test_gradients_follow_the_clipped_ste_and_lsq_on_every_backend(name, bitwidth):
    x, scale, offset, qmax = case_tensors(*CASES[name], bitwidth, seed=1)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    gf = 0.37
    gx_ref, gs_ref, go_ref = oracle_grads(grad, x, scale, offset, qmax, gf)
    xr, sr, orr = x.clone().requires_grad_(), scale.clone().requires_grad_(), offset.clone().requires_grad_()
    fake_quantize(xr, sr, orr, qmax, grad_factor=gf).backward(grad)
    backends = {"C++ kernel": (xr.grad, sr.grad, orr.grad),
                "ATen ops": aten.backward(grad, x, scale, offset, qmax, gf, True)}
    for backend, (gx, gs, go) in backends.items():
        assert gs.shape == scale.shape and go.shape == offset.shape, backend
        assert np.array_equal(gx.numpy(), gx_ref), f"{backend}: input gradient"
        assert close(gs, gs_ref), f"{backend}: scale gradient"
        assert close(go, go_ref), f"{backend}: offset gradient"


@pytest.mark.parametrize("name", list(CASES))
def test_the_op_equals_the_reference_bit_for_bit_forward_and_every_gradient(name):
    """Forward and input gradient on any data; the encoding gradients on data whose every sum is exact
    (power-of-two scales, quarter steps, dyadic gradients), where the summation order cannot matter."""
    fmt = IntFormat(4, True)
    x, scale, offset, qmax = case_tensors(*CASES[name], 4, seed=5, dyadic=True)
    grad = torch.randint(-4, 5, x.shape, generator=torch.Generator().manual_seed(6)).float() / 8
    xr, sr, orr = x.clone().requires_grad_(), scale.clone().requires_grad_(), offset.clone().requires_grad_()
    y = fake_quantize(xr, sr, orr, qmax, grad_factor=0.5)
    y.backward(grad)
    assert torch.equal(y, reference.quantize_dequantize(x, scale, offset, fmt))
    rx, rs, ro = reference.quantize_dequantize_backward(grad, x, scale, offset, fmt, 0.5)
    assert torch.equal(xr.grad, rx) and torch.equal(sr.grad, rs) and torch.equal(orr.grad, ro)
    assert rs.abs().sum() > 0 and ro.abs().sum() > 0  # values were clipped: both gradients have terms
    x, scale, offset, qmax = case_tensors(*CASES[name], 8, seed=7)  # any data: forward and grad_x exact
    xr = x.clone().requires_grad_()
    y = fake_quantize(xr, scale, offset, qmax)
    y.backward(grad)
    fmt = IntFormat(8, True)
    assert torch.equal(y, reference.quantize_dequantize(x, scale, offset, fmt))
    assert torch.equal(xr.grad, reference.quantize_dequantize_backward(grad, x, scale, offset, fmt, 1.0)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["per channel axis 1", "blocks along the last dim", "blocks on two axes"])
def test_other_dtypes_are_computed_in_float32_as_the_reference(dtype, name):
    x, scale, offset, qmax = case_tensors(*CASES[name], 8, seed=8)
    x = x.to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    xr, sr = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = fake_quantize(xr, sr, offset, qmax)
    y.backward(grad)
    fmt = IntFormat(8, True)
    rx, rs, _ = reference.quantize_dequantize_backward(grad, x, scale, offset, fmt, 1.0)
    assert y.dtype == dtype and xr.grad.dtype == dtype
    assert torch.equal(y, reference.quantize_dequantize(x, scale, offset, fmt)) and torch.equal(xr.grad, rx)
    torch.testing.assert_close(sr.grad, rs, rtol=1e-4, atol=1e-5 * float(rs.abs().max()))
    xm = x.clone().requires_grad_()
    fake_quantize(xm, scale, offset, qmax).backward(grad)  # fixed encodings: the masked path
    assert torch.equal(xm.grad, rx)


@pytest.mark.parametrize("name", ["per tensor 4-D", "per channel axis 1", "blocks along axis 1 of a conv weight",
                                  "blocks on two axes"])
def test_non_contiguous_inputs_give_the_contiguous_result(name):
    x, scale, offset, qmax = case_tensors(*CASES[name], 8, seed=10)
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)  # same values, not contiguous
    assert not strided.is_contiguous()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    xr, sr = strided.clone().requires_grad_(), scale.clone().requires_grad_()
    y = fake_quantize(xr, sr, offset, qmax)
    y.backward(grad)
    xc, sc = x.clone().requires_grad_(), scale.clone().requires_grad_()
    yc = fake_quantize(xc, sc, offset, qmax)
    yc.backward(grad)
    assert y.stride() == torch.empty_like(strided).stride()
    assert torch.equal(y, yc) and torch.equal(xr.grad, xc.grad)
    torch.testing.assert_close(sr.grad, sc.grad, rtol=1e-5, atol=1e-6 * float(sc.grad.abs().max()))


def test_one_offset_serves_every_scale_element():
    x, scale, offset, qmax = case_tensors(*CASES["blocks along the last dim"], 8, seed=12)
    one = torch.tensor([-128.0], requires_grad=True)
    grad = torch.randn(x.shape)
    y = fake_quantize(x, scale, one, qmax)
    y.backward(grad)
    full = torch.full_like(scale, -128.0).requires_grad_()
    fake_quantize(x, scale, full, qmax).backward(grad)
    assert torch.equal(y, reference.quantize_dequantize(x, scale, one.detach(), IntFormat(8, True)))
    assert one.grad.shape == (1,)
    torch.testing.assert_close(one.grad, full.grad.sum().reshape(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_shape,offset_shape,match", [
    ((3, 1), (3, 1), "scale of shape \\[3, 1\\] does not fit x of shape \\[16, 128\\]"),
    ((16,), (16,), "scale of shape \\[16\\] does not fit x of shape \\[16, 128\\]"),
    ((16, 4), (4,), "offset of shape \\[4\\] does not fit scale of shape \\[16, 4\\]"),
])
def test_a_scale_that_does_not_fit_is_one_clear_error_on_every_backend(scale_shape, offset_shape, match):
    x = torch.randn(16, 128)
    scale, offset = torch.full(scale_shape, 0.1), torch.zeros(offset_shape)
    for call in (lambda: fake_quantize(x, scale, offset, 255), lambda: aten.forward(x, scale, offset, 255, 1.0),
                 lambda: torch.ops.qat.quantize_dequantize_with_mask(x, scale, offset, 255)):
        with pytest.raises(RuntimeError, match=match + ".*allowed"):
            call()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bitwidth", (2, 8))
def test_the_masked_forward_and_its_gradient_follow_the_contract_on_every_backend(name, bitwidth):
    """``quantize_dequantize_with_mask`` gives the forward and the STE's mask; ``mask_gradient``
    the clipped-STE input gradient from that mask: the fixed-encoding path autograd takes."""
    x, scale, offset, qmax = case_tensors(*CASES[name], bitwidth, seed=3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    expected, _ = oracle(x, scale, offset, qmax)
    gx_ref, _, _ = oracle_grads(grad, x, scale, offset, qmax, 1.0)
    backends = {"C++ kernel": (torch.ops.qat.quantize_dequantize_with_mask, torch.ops.qat.mask_gradient),
                "ATen ops": (aten.forward_with_mask, aten.mask_gradient)}
    for backend, (forward, gradient) in backends.items():
        y, inside = forward(x, scale, offset, qmax)
        assert inside.dtype == torch.bool and inside.shape == x.shape, backend
        assert np.array_equal(y.numpy(), expected), f"{backend}: forward"
        gx = gradient(grad, inside).numpy()
        assert np.array_equal(gx, gx_ref) and not np.signbit(gx[gx == 0]).any(), f"{backend}: gradient (+0 outside)"


def test_fixed_encodings_save_a_one_byte_mask_for_backward_not_the_input():
    """Memory: with fixed encodings autograd keeps 1 byte per element (the mask), not x's 4."""
    x, scale, offset, qmax = case_tensors((64, 3, 7, 7), (1,), 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fake_quantize(x.clone().requires_grad_(), scale, offset, qmax)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quantize(x.clone().requires_grad_(), scale.clone().requires_grad_(), offset, qmax)
    assert torch.float32 in [t.dtype for t in saved], "learned encodings need x for their gradients"
    with torch.no_grad():
        assert torch.equal(fake_quantize(x, scale, offset, qmax), y)


def test_the_mask_gradient_follows_any_gradient_layout():
    """Autograd may hand the backward a gradient whose strides differ from the saved mask's."""
    x = torch.randn(4, 8, 5, 5) * 4
    scale, offset = torch.tensor([0.02]), torch.tensor([-128.0])
    _, inside = torch.ops.qat.quantize_dequantize_with_mask(x, scale, offset, 255)
    grad = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)
    out = torch.ops.qat.mask_gradient(grad, inside)
    assert out.stride() == grad.stride()
    assert torch.equal(out, torch.where(inside, grad, 0.0))


def test_encoding_gradients_are_skipped_when_nothing_needs_them():
    x, scale, offset, qmax = case_tensors((64, 3, 7, 7), (64, 1, 1, 1), 8)
    xr = x.clone().requires_grad_()
    fake_quantize(xr, scale, offset, qmax).sum().backward()
    assert scale.grad is None and offset.grad is None
    r = torch.round(x / scale)
    assert torch.equal(xr.grad, ((r >= offset) & (r <= offset + qmax)).float())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.slow
def test_triton_kernels_match_the_contract_under_the_interpreter():
    """The CUDA kernels' math (integer and float grids), run by Triton's interpreter on CPU tensors (no
    GPU needed). (bfloat16 outputs are checked on a GPU by benchmarks/gpu_check.py: the interpreter's
    float32 -> bfloat16 conversion truncates where a GPU's rounds to nearest even.)"""
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_kernels import CASES, case_tensors, close, oracle, oracle_grads
        from orchestrator.quant import kernels
        from orchestrator.quant.kernels import triton_kernels as tk
        kernels.backend()
        bad = []
        for name, (shape, scale_shape) in CASES.items():
            for bw in (2, 8, 16):
                x, s, o, qmax = case_tensors(shape, scale_shape, bw)
                expected, r = oracle(x, s, o, qmax)
                if not np.array_equal(tk.forward(x, s, o, qmax, 1.0).numpy(), expected):
                    bad.append(("forward", name, bw))
                y, inside = tk.forward_with_mask(x, s, o, qmax)
                gx_masked = torch.ops.qat.mask_gradient(torch.ones(shape), inside).numpy()
                if not (np.array_equal(y.numpy(), expected) and inside.dtype == torch.bool
                        and np.array_equal(gx_masked, oracle_grads(torch.ones(shape), x, s, o, qmax, 1.0)[0])):
                    bad.append(("forward with mask", name, bw))
                g = torch.randn(shape)
                gx_ref, gs_ref, go_ref = oracle_grads(g, x, s, o, qmax, 0.5)
                gx, _, _ = tk.backward(g, x, s, o, qmax, 0.5, False)
                gx2, gs, go = tk.backward(g, x, s, o, qmax, 0.5, True)
                ok = np.array_equal(gx.numpy(), gx_ref) and np.array_equal(gx2.numpy(), gx_ref)
                ok = ok and gs.shape == s.shape and close(gs, gs_ref) and close(go, go_ref)
                if not ok:
                    bad.append(("backward", name, bw))
        x = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)  # per channel on a channels-last tensor
        s, o = torch.rand(1, 8, 1, 1) * 0.1 + 0.01, torch.zeros(1, 8, 1, 1)
        y, inside = tk.forward_with_mask(x, s, o, 255)
        y_ref, inside_ref = torch.ops.qat.quantize_dequantize_with_mask(x.contiguous(), s, o, 255)
        if not (y.stride() == inside.stride() == x.stride() and inside.dtype == torch.bool
                and torch.equal(y, y_ref) and torch.equal(inside, inside_ref)):
            bad.append(("forward with mask, channels last",))
        from orchestrator.quant import reference
        from orchestrator.quant.formats import FORMATS
        from orchestrator.quant.kernels import aten
        for name, (shape, scale_shape) in CASES.items():  # the float ops: FP8 and FP4 grids, range learning
            for fmt in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1"):
                f = FORMATS[fmt]
                args = (f.mantissa_bits, f.min_normal_exponent, f.max)
                x = torch.randn(shape) * torch.exp2(torch.randint(-14, 20, shape).float())
                s = torch.rand(scale_shape) + 0.01
                y, inside = tk.float_forward_with_mask(x, s, *args)
                ref, ref_inside = reference.quantize_dequantize_with_mask(x, s, torch.zeros(1), f)
                ok = torch.equal(y, ref) and torch.equal(inside, ref_inside)
                ok = ok and torch.equal(tk.float_forward(x, s, *args), ref)
                g, log_s, log_floor = torch.randn(shape), s.log(), torch.full(scale_shape, -30.0)
                gx, g_log = tk.float_learned_backward(g, x, log_s, log_floor, *args, 0.5)
                gx_ref, g_log_ref = aten.float_learned_backward(g, x, log_s, log_floor, *args, 0.5)
                ok = ok and torch.equal(gx, gx_ref) and close(g_log, g_log_ref.numpy())
                if not ok:
                    bad.append(("float", name, fmt))
        print("BAD", bad)
        sys.exit(1 if bad else 0)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_the_kernel_built_for_other_instruction_sets_follows_the_contract(capability):
    """The C++ kernel has AVX-512, AVX2 and portable code paths (the mask bytes and the float formats'
    exponent bits above all); ``ATEN_CPU_CAPABILITY`` makes torch, and so the build, target a smaller
    set on this machine."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_kernels import CASES, case_tensors, close, oracle, oracle_grads
        from orchestrator.quant import kernels, reference
        from orchestrator.quant.fake_quant import fake_quantize
        from orchestrator.quant.formats import FORMATS
        assert kernels.backend() == "cpp" and torch.backends.cpu.get_cpu_capability() == {capability!r}
        bad = []
        for name, (shape, scale_shape) in CASES.items():
            for bw in (2, 8):
                x, s, o, qmax = case_tensors(shape, scale_shape, bw)
                g = torch.randn(shape)
                expected, _ = oracle(x, s, o, qmax)
                gx_ref, gs_ref, _ = oracle_grads(g, x, s, o, qmax, 1.0)
                xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
                fake_quantize(xr, sr, o, qmax).backward(g)
                y, inside = torch.ops.qat.quantize_dequantize_with_mask(x, s, o, qmax)
                ok = (np.array_equal(y.numpy(), expected) and np.array_equal(xr.grad.numpy(), gx_ref)
                      and np.array_equal(torch.ops.qat.mask_gradient(g, inside).numpy(), gx_ref)
                      and close(sr.grad, gs_ref))
                if not ok:
                    bad.append((name, bw))
            for fmt in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1"):  # the float op's bit arithmetic
                f = FORMATS[fmt]
                x = torch.randn(shape) * torch.exp2(torch.randint(-14, 20, shape).float())
                s = torch.rand(scale_shape) + 0.01
                y, inside = torch.ops.qat.quantize_dequantize_float_with_mask(x, s, f.mantissa_bits,
                                                                              f.min_normal_exponent, f.max)
                ref, ref_inside = reference.quantize_dequantize_with_mask(x, s, torch.zeros(1), f)
                if not (torch.equal(y, ref) and torch.equal(inside, ref_inside)):
                    bad.append((name, fmt))
        print("BAD", bad)
        sys.exit(1 if bad else 0)
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_the_aten_definition_serves_a_whole_simulation_when_the_kernel_is_off():
    """``QAT_FAKE_QUANT_KERNEL=python``: the op defined from Python trains and compiles the same way."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from orchestrator.quant import QuantConfig, QuantizationSimModel, kernels
        from orchestrator.zoo.models import DigitsCNN
        assert kernels.backend() == "python", kernels.backend()
        torch.manual_seed(0)
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
        sim = QuantizationSimModel(DigitsCNN().eval(), x[:2], QuantConfig(range_learning=True))
        sim.compute_encodings(lambda m, b: m(b), x)
        sim.model.eval()
        out = sim.model(x)
        F.cross_entropy(out, y).backward()
        eager = {n: p.grad.clone() for n, p in sim.model.named_parameters() if p.grad is not None}
        sim.model.zero_grad()
        import torch._inductor.config as inductor_config  # channels-last convs flip masks at +-0 (see test_compile_fused_op)
        with inductor_config.patch(layout_optimization=False):
            compiled = torch.compile(sim.model, fullgraph=True)
            assert torch.equal(compiled(x), out)
            F.cross_entropy(compiled(x), y).backward()
        floor = 1e-6 * max(g.norm() for g in eager.values())
        for n, g in eager.items():
            err = (sim.model.get_parameter(n).grad - g).norm() / max(g.norm(), floor)
            assert err <= 1e-4, (n, float(err))
        print("OK")
    """)
    env = {**os.environ, "QAT_FAKE_QUANT_KERNEL": "python"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_a_bad_kernel_choice_is_one_clear_error():
    proc = subprocess.run([sys.executable, "-c", "from orchestrator.quant import kernels; kernels.backend()"],
                          capture_output=True, text=True, env={**os.environ, "QAT_FAKE_QUANT_KERNEL": "cuda"},
                          timeout=120)
    assert proc.returncode != 0
    assert "QAT_FAKE_QUANT_KERNEL='cuda' is not allowed; allowed: cpp, python" in proc.stderr


def test_outputs_keep_the_input_layout_as_the_fake_kernel_promises():
    """torch.compile hands channels-last activations to the op and trusts ``empty_like(x)`` strides."""
    x = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)
    one = (torch.tensor([0.05]), torch.tensor([-128.0]))
    per_channel = (torch.rand(1, 8, 1, 1) * 0.1 + 0.01, torch.zeros(1, 8, 1, 1))
    per_block = (torch.rand(1, 2, 1, 1) * 0.1 + 0.01, torch.zeros(1, 2, 1, 1))
    for scale, offset in (one, per_channel, per_block):
        xr = x.clone().requires_grad_()
        y = fake_quantize(xr, scale, offset, 255)
        assert y.stride() == torch.empty_like(x).stride()
        assert torch.equal(y, fake_quantize(x.contiguous(), scale, offset, 255))
        y.backward(torch.ones_like(y))
        assert xr.grad.stride() == torch.empty_like(x).stride()
