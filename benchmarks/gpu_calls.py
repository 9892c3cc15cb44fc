"""Host (CPU) cost of one fake-quant call on CUDA, beside plain ATen ops: microseconds to issue a
call on a small tensor (the GPU never limits), for the op's layers (dispatcher, Python wrapper,
Triton launch) and for forward + backward through autograd.

    python benchmarks/gpu_calls.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.quant import kernels  # noqa: E402
from orchestrator.quant.fake_quant import fake_quantize, fake_quantize_learned  # noqa: E402
from orchestrator.quant.kernels import triton_kernels as tk  # noqa: E402


def issue_us(call: Callable[[], object], n: int = 300) -> float:
    """Mean host time to issue ``call``, in microseconds (after 20 warm-up calls)."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_calls: no CUDA device")
    print("fake-quant kernel", kernels.backend())
    d = torch.device("cuda")
    x = torch.randn(64, 64, 8, 8, device=d)
    g = torch.randn_like(x)
    s, o = torch.tensor([0.05], device=d), torch.tensor([-128.0], device=d)
    sc, oc = torch.full((64, 1, 1, 1), 0.05, device=d), torch.full((64, 1, 1, 1), -128.0, device=d)
    n = x.numel()
    xr = x.clone().requires_grad_()
    log_scale = torch.full((64, 1, 1, 1), -3.0, device=d, requires_grad=True)
    log_floor = torch.full((64, 1, 1, 1), -10.0, device=d)
    offset = torch.full((64, 1, 1, 1), -100.0, device=d, requires_grad=True)

    def fwd_bwd(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: f().backward(g)

    calls = {
        "x * 1.0 (ATen)": lambda: x * 1.0,
        "torch.fake_quantize_per_tensor_affine (ATen)": lambda: torch.fake_quantize_per_tensor_affine(
            x, 0.05, 0, -128, 127),
        "op forward, per tensor": lambda: fake_quantize(x, s, o, 255),
        "op forward, per channel": lambda: fake_quantize(x, sc, oc, 255),
        "op forward with mask (fixed encodings)": lambda: torch.ops.qat.quantize_dequantize_with_mask(x, s, o, 255),
        "  its Python wrapper alone": lambda: tk.forward(x, s, o, 255, 1.0),
        "  its Triton launch alone": lambda: tk._forward_kernel[(tk.triton.cdiv(n, tk.BLOCK),)](
            x, g, g, s, o, n, n, 1, 255.0, BLOCK_SIZE=tk.BLOCK, WITH_MASK=False),
        "mask_gradient (C++, at::where)": lambda: torch.ops.qat.mask_gradient(g, x > 0),
        "op backward with encoding gradients": lambda: torch.ops.qat.quantize_dequantize_backward(
            g, x, sc, oc, 255, 1.0, True),
        "autograd x * 1.0, forward + backward": fwd_bwd(lambda: xr * 1.0),
        "autograd op, fixed encodings": fwd_bwd(lambda: fake_quantize(xr, s, o, 255)),
        "autograd op, learned encodings": fwd_bwd(
            lambda: fake_quantize_learned(xr, log_scale, log_floor, offset, 255, 0.01, True)),
    }
    for label, call in calls.items():
        print(f"{label:48s} {issue_us(call):8.1f} us/call")


if __name__ == "__main__":
    main()
