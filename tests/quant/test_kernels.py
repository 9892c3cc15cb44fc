"""The fused op ``qat::quantize_dequantize`` on every backend present: the C++ kernel, the ATen-ops
definition (machines without a compiler), and the Triton kernel (run by Triton's interpreter on CPU
tensors where there is no GPU). Each against the contract: ``s * clamp(round(x / s), o, o + qmax)``
with true float32 division and ties to even, the clipped STE, and the LSQ/LSQ+ encoding gradients."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from orchestrator.quant import kernels
from orchestrator.quant.fake_quant import fake_quantize
from orchestrator.quant.kernels import _backward_aten, _forward_aten, _forward_mask_aten, _mask_gradient_aten

CASES = [((5000,), None), ((64, 3, 7, 7), 0), ((8, 16, 5, 5), 1), ((4, 6, 33), 2), ((33, 17), 1), ((7,), 0)]
BITS = (2, 4, 8, 16)


def case_tensors(shape, axis, bitwidth, seed=0):
    """``x`` with exact .5 ties planted in channel 0 (a power-of-two scale), plus ``scale``/``offset``."""
    gen = torch.Generator().manual_seed(seed)
    qmax = 2**bitwidth - 1
    channels = 1 if axis is None else shape[axis]
    scale = torch.rand(channels, generator=gen) * 0.1 + 0.01
    scale[0] = 2.0**-5
    offset = torch.randint(-qmax, 1, (channels,), generator=gen).float()
    x = torch.randn(shape, generator=gen) * 3
    first = x.movedim(axis, 0)[0] if axis is not None else x
    k = torch.randint(-300, 300, first.shape, generator=gen).float()
    first.copy_((k + 0.5) * 2.0**-5)  # ties in channel 0
    return x, scale, offset, qmax


def reference(x, scale, offset, qmax, axis):
    """The contract in numpy float32: true division, np.round (ties to even), clamp, multiply."""
    s, o = scale.numpy(), offset.numpy()
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, o = s.reshape(shape), o.reshape(shape)
    r = np.round(x.numpy() / s)
    return (np.clip(r, o, o + qmax) * s).astype(np.float32), r


def reference_grads(grad, x, scale, offset, qmax, axis, gf):
    """Clipped-STE input gradient and the LSQ/LSQ+ encoding gradients (sums in float64)."""
    _, r = reference(x, scale, offset, qmax, axis)
    s, o = scale.numpy(), offset.numpy()
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, o = s.reshape(shape), o.reshape(shape)
    u = (x.numpy() / s).astype(np.float64)  # x / s in float32, as the contract divides
    c = np.clip(r, o, o + qmax)
    inside = (r >= o) & (r <= o + qmax)
    g = grad.numpy().astype(np.float64)
    gx = np.where(inside, grad.numpy(), 0.0).astype(np.float32)
    dims = tuple(d for d in range(x.dim()) if axis is None or d != axis)
    gs = (g * c - np.where(inside, g * u, 0.0)).sum(axis=dims) * gf
    go = np.where(inside, 0.0, g).sum(axis=dims) * scale.numpy().astype(np.float64) * gf
    return gx, gs.reshape(-1), go.reshape(-1)


def test_the_cpp_kernel_is_built_on_a_machine_with_a_compiler():
    assert kernels.backend() == "cpp"


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("bitwidth", BITS)
def test_forward_is_bit_exact_with_the_contract_on_every_backend(shape, axis, bitwidth):
    x, scale, offset, qmax = case_tensors(shape, axis, bitwidth)
    expected, _ = reference(x, scale, offset, qmax, axis)
    op = fake_quantize(x, scale, offset, qmax, axis).numpy()
    aten = _forward_aten(x, scale, offset, qmax, -1 if axis is None else axis, 1.0).numpy()
    assert np.array_equal(op, expected), f"C++ kernel: {np.sum(op != expected)} element(s) differ"
    assert np.array_equal(aten, expected), f"ATen ops: {np.sum(aten != expected)} element(s) differ"


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("bitwidth", (4, 8, 16))
def test_gradients_follow_the_clipped_ste_and_lsq_on_every_backend(shape, axis, bitwidth):
    x, scale, offset, qmax = case_tensors(shape, axis, bitwidth, seed=1)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    gf = 0.37
    gx_ref, gs_ref, go_ref = reference_grads(grad, x, scale, offset, qmax, axis, gf)
    xr, sr, orr = x.clone().requires_grad_(), scale.clone().requires_grad_(), offset.clone().requires_grad_()
    fake_quantize(xr, sr, orr, qmax, axis, gf).backward(grad)
    aten = _backward_aten(grad, x, scale, offset, qmax, -1 if axis is None else axis, gf, True)
    for name, (gx, gs, go) in {"C++ kernel": (xr.grad, sr.grad, orr.grad), "ATen ops": aten}.items():
        assert np.array_equal(gx.numpy(), gx_ref), f"{name}: input gradient"
        scale_of = np.abs(gs_ref).max() + 1e-12
        assert np.allclose(gs.numpy(), gs_ref, rtol=1e-4, atol=1e-5 * scale_of), f"{name}: scale gradient"
        assert np.allclose(go.numpy(), go_ref, rtol=1e-4, atol=1e-5 * (np.abs(go_ref).max() + 1e-12)), \
            f"{name}: offset gradient"


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("bitwidth", (2, 8))
def test_the_masked_forward_and_its_gradient_follow_the_contract_on_every_backend(shape, axis, bitwidth):
    """``quantize_dequantize_with_mask`` gives the forward and the STE's mask; ``mask_gradient``
    the clipped-STE input gradient from that mask: the fixed-encoding path autograd takes."""
    x, scale, offset, qmax = case_tensors(shape, axis, bitwidth, seed=3)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    expected, _ = reference(x, scale, offset, qmax, axis)
    gx_ref, _, _ = reference_grads(grad, x, scale, offset, qmax, axis, 1.0)
    a = -1 if axis is None else axis
    backends = {"C++ kernel": (torch.ops.qat.quantize_dequantize_with_mask, torch.ops.qat.mask_gradient),
                "ATen ops": (_forward_mask_aten, _mask_gradient_aten)}
    for name, (forward, gradient) in backends.items():
        y, inside = forward(x, scale, offset, qmax, a)
        assert inside.dtype == torch.bool and inside.shape == x.shape, name
        assert np.array_equal(y.numpy(), expected), f"{name}: forward"
        gx = gradient(grad, inside).numpy()
        assert np.array_equal(gx, gx_ref) and not np.signbit(gx[gx == 0]).any(), f"{name}: gradient (+0 outside)"


def test_fixed_encodings_save_a_one_byte_mask_for_backward_not_the_input():
    """Memory: with fixed encodings autograd keeps 1 byte per element (the mask), not x's 4."""
    x, scale, offset, qmax = case_tensors((64, 3, 7, 7), None, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fake_quantize(x.clone().requires_grad_(), scale, offset, qmax, None)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quantize(x.clone().requires_grad_(), scale.clone().requires_grad_(), offset, qmax, None)
    assert torch.float32 in [t.dtype for t in saved], "learned encodings need x for their gradients"
    with torch.no_grad():
        assert torch.equal(fake_quantize(x, scale, offset, qmax, None), y)


def test_the_mask_gradient_follows_any_gradient_layout():
    """Autograd may hand the backward a gradient whose strides differ from the saved mask's."""
    x = torch.randn(4, 8, 5, 5) * 4
    scale, offset = torch.tensor([0.02]), torch.tensor([-128.0])
    _, inside = torch.ops.qat.quantize_dequantize_with_mask(x, scale, offset, 255, -1)
    grad = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)
    out = torch.ops.qat.mask_gradient(grad, inside)
    assert out.stride() == grad.stride()
    assert torch.equal(out, torch.where(inside, grad, 0.0))


def test_encoding_gradients_are_skipped_when_nothing_needs_them():
    x, scale, offset, qmax = case_tensors((64, 3, 7, 7), 0, 8)
    xr = x.clone().requires_grad_()
    fake_quantize(xr, scale, offset, qmax, 0).sum().backward()
    assert scale.grad is None and offset.grad is None
    inside = (torch.round(x / scale.reshape(-1, 1, 1, 1)) - offset.reshape(-1, 1, 1, 1)).clamp(0, qmax) == (
        torch.round(x / scale.reshape(-1, 1, 1, 1)) - offset.reshape(-1, 1, 1, 1))
    assert torch.equal(xr.grad, inside.float())


def test_non_float32_inputs_take_the_aten_path():
    x, scale, offset, qmax = case_tensors((16, 8), 0, 8)
    y = fake_quantize(x.double(), scale, offset, qmax, 0)
    assert y.dtype == torch.float64
    assert torch.equal(y.float(), fake_quantize(x, scale, offset, qmax, 0))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.slow
def test_triton_kernels_match_the_contract_under_the_interpreter():
    """The CUDA kernels' math, run by Triton's interpreter on CPU tensors (no GPU needed)."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_kernels import CASES, case_tensors, reference, reference_grads
        from orchestrator.quant import kernels
        from orchestrator.quant.kernels import triton_kernels as tk
        kernels.backend()
        bad = []
        for shape, axis in CASES:
            for bw in (2, 8, 16):
                x, s, o, qmax = case_tensors(shape, axis, bw)
                a = -1 if axis is None else axis
                expected, r = reference(x, s, o, qmax, axis)
                if not np.array_equal(tk.forward(x, s, o, qmax, a, 1.0).numpy(), expected):
                    bad.append(("forward", shape, axis, bw))
                y, inside = tk.forward_with_mask(x, s, o, qmax, a)
                gx_masked = torch.ops.qat.mask_gradient(torch.ones(shape), inside).numpy()
                if not (np.array_equal(y.numpy(), expected) and inside.dtype == torch.bool
                        and np.array_equal(gx_masked, reference_grads(torch.ones(shape), x, s, o, qmax, axis, 1.0)[0])):
                    bad.append(("forward with mask", shape, axis, bw))
                g = torch.randn(shape)
                gx_ref, gs_ref, go_ref = reference_grads(g, x, s, o, qmax, axis, 0.5)
                gx, _, _ = tk.backward(g, x, s, o, qmax, a, 0.5, False)
                gx2, gs, go = tk.backward(g, x, s, o, qmax, a, 0.5, True)
                ok = np.array_equal(gx.numpy(), gx_ref) and np.array_equal(gx2.numpy(), gx_ref)
                ok = ok and np.allclose(gs.numpy(), gs_ref, rtol=1e-4, atol=1e-5 * (abs(gs_ref).max() + 1e-12))
                ok = ok and np.allclose(go.numpy(), go_ref, rtol=1e-4, atol=1e-5 * (abs(go_ref).max() + 1e-12))
                if not ok:
                    bad.append(("backward", shape, axis, bw))
        x = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)  # per channel on a channels-last tensor
        s, o = torch.rand(8) * 0.1 + 0.01, torch.zeros(8)
        y, inside = tk.forward_with_mask(x, s, o, 255, 1)
        y_ref, inside_ref = torch.ops.qat.quantize_dequantize_with_mask(x.contiguous(), s, o, 255, 1)
        if not (y.stride() == inside.stride() == x.stride() and inside.dtype == torch.bool
                and torch.equal(y, y_ref) and torch.equal(inside, inside_ref)):
            bad.append(("forward with mask, channels last",))
        print("BAD", bad)
        sys.exit(1 if bad else 0)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_the_kernel_built_for_other_instruction_sets_follows_the_contract(capability):
    """The C++ kernel has AVX-512, AVX2 and portable code paths (the mask bytes above all);
    ``ATEN_CPU_CAPABILITY`` makes torch, and so the build, target a smaller set on this machine."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_kernels import CASES, case_tensors, reference, reference_grads
        from orchestrator.quant import kernels
        from orchestrator.quant.fake_quant import fake_quantize
        assert kernels.backend() == "cpp" and torch.backends.cpu.get_cpu_capability() == {capability!r}
        bad = []
        for shape, axis in CASES:
            for bw in (2, 8):
                x, s, o, qmax = case_tensors(shape, axis, bw)
                g = torch.randn(shape)
                expected, _ = reference(x, s, o, qmax, axis)
                gx_ref, gs_ref, _ = reference_grads(g, x, s, o, qmax, axis, 1.0)
                xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
                fake_quantize(xr, sr, o, qmax, axis).backward(g)
                y, inside = torch.ops.qat.quantize_dequantize_with_mask(x, s, o, qmax, -1 if axis is None else axis)
                ok = (np.array_equal(y.numpy(), expected) and np.array_equal(xr.grad.numpy(), gx_ref)
                      and np.array_equal(torch.ops.qat.mask_gradient(g, inside).numpy(), gx_ref)
                      and np.allclose(sr.grad.numpy(), gs_ref, rtol=1e-4, atol=1e-5 * (abs(gs_ref).max() + 1e-12)))
                if not ok:
                    bad.append((shape, axis, bw))
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
    one, per_channel = (torch.tensor([0.05]), torch.tensor([-128.0])), (torch.rand(8) * 0.1 + 0.01, torch.zeros(8))
    for scale, offset in (one, per_channel):
        axis = 1 if scale.numel() > 1 else None
        xr = x.clone().requires_grad_()
        y = fake_quantize(xr, scale, offset, 255, axis)
        assert y.stride() == torch.empty_like(x).stride()
        assert torch.equal(y, fake_quantize(x.contiguous(), scale, offset, 255, axis))
        y.backward(torch.ones_like(y))
        assert xr.grad.stride() == torch.empty_like(x).stride()
