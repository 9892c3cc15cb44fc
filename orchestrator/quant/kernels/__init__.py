"""The fused fake-quant op ``torch.ops.qat.quantize_dequantize`` and where its kernels come from.

One op per quantizer call, registered with ``torch.library``, so eager and compiled code run
the same kernel and ``torch.compile`` sees one opaque op per quantizer (no graph break, no
specialisation on encoding values, no recompile when encodings change). Integer formats
(``qmax = 2^b - 1``) and, with fixed scales, the scaled float formats; ``scale``/``offset`` in
``reference.py``'s layout: one element (per tensor) or ``x``'s rank with every dim dividing ``x``'s
(per channel ``[1, C, 1, 1]``, per block ``[C, K / B]``, per token ``[..., 1]``); ``offset`` one
element or the scale's shape:

    quantize_dequantize(x, scale, offset, qmax, grad_factor) -> x_hat
    quantize_dequantize_backward(grad, x, scale, offset, qmax, grad_factor, encoding_grads)
        -> (grad_x, grad_scale, grad_offset)     (the encoding gradients in scale's / offset's shapes)
    quantize_dequantize_learned(x, log_scale, log_floor, offset, qmax, grad_factor, learn_offset)
        -> x_hat     (range learning: the encoding from its parameters)
    quantize_dequantize_with_mask(x, scale, offset, qmax) -> (x_hat, inside: bool like x)
    mask_gradient(grad, inside) -> grad where inside, else 0
    quantize_dequantize_float(x, scale, mantissa_bits, min_exponent, max) -> x_hat       (``cpp`` only)
    quantize_dequantize_float_with_mask(x, scale, mantissa_bits, min_exponent, max) -> (x_hat, inside)
        the scaled float formats (FP8, FP4 e2m1; MX/NVFP4 elements) with a fixed scale, no offset
    quantize_dequantize_float_learned(x, log_scale, log_floor, mantissa_bits, min_exponent, max,
                                      grad_factor) -> x_hat     (``cpp`` only; range learning)

With fixed encodings (nothing asks for the scale's or offset's gradient) the ``cpp`` autograd
saves the 1-byte ``inside`` mask of ``quantize_dequantize_with_mask`` instead of ``x`` and its
backward is ``mask_gradient``: a quarter of the memory per quantized tensor, no division in the
backward pass, and on CUDA a backward that never enters Python.

Kernels, chosen once per process (``backend()`` says which):

- ``cpp``: ``fake_quant.cpp``, built on first use with the machine's compiler and cached by
  ``torch.utils.cpp_extension`` (``$TORCH_EXTENSIONS_DIR``, about 15 s once): vectorized
  (``at::vec``, AVX2/AVX-512 as ``torch.backends.cpu.get_cpu_capability()`` reports) and
  multi-threaded (OpenMP, torch's threads), one pass forward and one backward; the schema, CPU
  kernels and autograd live in C++, so an eager call costs one dispatch. Other devices get
  ``aten.py``: the reference's own ATen ops.
- ``python``: the op defined from Python, its kernels ``aten.py`` (the reference's math), when no
  compiler is available or ``QAT_FAKE_QUANT_KERNEL=python``.
- On CUDA, a Triton kernel (``triton_kernels.py``) replaces the ATen-ops path when Triton is
  installed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

import torch

from . import aten

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fake_quant.cpp")
SCHEMAS = {
    "quantize_dequantize": "(Tensor x, Tensor scale, Tensor offset, int qmax, float grad_factor) -> Tensor",
    "quantize_dequantize_backward": "(Tensor grad, Tensor x, Tensor scale, Tensor offset, int qmax, "
                                    "float grad_factor, bool encoding_grads) -> (Tensor, Tensor, Tensor)",
    "quantize_dequantize_learned": "(Tensor x, Tensor log_scale, Tensor log_floor, Tensor offset, int qmax, "
                                   "float grad_factor, bool learn_offset) -> Tensor",
    "quantize_dequantize_with_mask": "(Tensor x, Tensor scale, Tensor offset, int qmax) -> (Tensor, Tensor)",
    "mask_gradient": "(Tensor grad, Tensor mask) -> Tensor",
}
CAPABILITY_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
}
_BACKEND: str | None = None


STALE_BUILD_LOCK_S = 600.0


def _clear_stale_build_lock(build_dir: Path) -> None:
    """A build killed mid-way (Ctrl-C, SIGKILL) leaves torch's ``lock`` file behind, and every later
    build would wait on it forever. A lock older than ``STALE_BUILD_LOCK_S`` (a build takes 15-60 s)
    is removed, with a warning."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_S:
        log.warning("fused fake-quant kernel: removing a build lock left %.0f s ago by an interrupted build (%s)",
                    age, lock)
        lock.unlink(missing_ok=True)


def _build_cpp() -> None:
    """Build (or load the cached) kernel. ``-fopenmp``: without it ``at::parallel_for`` in the
    extension runs on one thread (measured: 1.8x slower on 2 cores); the OpenMP runtime is the one
    torch already loaded (same soname). Compilers without OpenMP (macOS clang) build it serial."""
    from torch.utils.cpp_extension import _get_build_directory, load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-std=c++17", *CAPABILITY_FLAGS.get(capability, [])]
    # named by the source and flags: two checkouts (or versions) never rebuild each other's kernel
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
    name = f"qat_fake_quant_{capability.lower()}_{digest}"
    _clear_stale_build_lock(Path(_get_build_directory(name, verbose=False)))
    try:
        load(name=name, sources=[str(SOURCE)], extra_cflags=[*flags, "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - retried without OpenMP; a second failure propagates
        log.warning("fused fake-quant kernel: no OpenMP build (%s); building it single-threaded",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _clear_stale_build_lock(Path(_get_build_directory(f"{name}_serial", verbose=False)))
        load(name=f"{name}_serial", sources=[str(SOURCE)], extra_cflags=flags, is_python_module=False,
             verbose=False)


def _learned_aten(x, log_scale, log_floor, offset, qmax, grad_factor, learn_offset):
    """Range learning from differentiable pieces: straight-through floor and rounding, then the op."""
    from ..encoding import SCALE_CEIL
    from ..fake_quant import clamp_straight_through, round_clamp_straight_through

    scale = clamp_straight_through(log_scale, log_floor, math.log(SCALE_CEIL)).exp()
    if learn_offset:
        offset = round_clamp_straight_through(offset, -float(qmax), 0.0)
    return torch.ops.qat.quantize_dequantize(x, scale, offset, qmax, grad_factor)


def _define_python() -> None:
    """The op from Python, same schema, the reference's math (``aten.py``), for machines without a C++ compiler."""
    lib = torch.library.Library("qat", "DEF")  # noqa: F841 - kept alive in _PY_LIBRARY
    for name, schema in SCHEMAS.items():
        lib.define(f"{name}{schema}", tags=(torch.Tag.flexible_layout,))  # as fake_quant.cpp says why
    lib.impl("quantize_dequantize_learned", _learned_aten, "CompositeImplicitAutograd")
    lib.impl("mask_gradient", aten.mask_gradient, "CompositeExplicitAutograd")

    def setup(ctx, inputs, output):
        x, scale, offset, qmax, gf = inputs
        ctx.save_for_backward(x, scale, offset)
        ctx.args = (qmax, gf)

    def backward(ctx, grad):
        x, scale, offset = ctx.saved_tensors
        need = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        gx, gs, go = torch.ops.qat.quantize_dequantize_backward(grad, x, scale, offset, *ctx.args, need)
        return gx, (gs if need else None), (go if need else None), None, None

    torch.library.register_autograd("qat::quantize_dequantize", backward, setup_context=setup)
    global _PY_LIBRARY
    _PY_LIBRARY = lib


def _register_aten() -> None:
    """``aten.py`` (the reference's ATen ops) as the kernels of every device without its own (both backends)."""
    lib = torch.library.Library("qat", "IMPL")
    lib.impl("quantize_dequantize", aten.forward, "CompositeExplicitAutograd")
    lib.impl("quantize_dequantize_backward", aten.backward, "CompositeExplicitAutograd")
    lib.impl("quantize_dequantize_with_mask", aten.forward_with_mask, "CompositeExplicitAutograd")
    if _BACKEND == "cpp":  # the float ops are defined in C++ only (the python backend runs the reference op)
        lib.impl("quantize_dequantize_float", aten.float_forward, "CompositeExplicitAutograd")
        lib.impl("quantize_dequantize_float_with_mask", aten.float_forward_with_mask, "CompositeExplicitAutograd")
        lib.impl("quantize_dequantize_float_learned", aten.float_learned_forward, "CompositeExplicitAutograd")
        lib.impl("quantize_dequantize_float_learned_backward", aten.float_learned_backward,
                 "CompositeExplicitAutograd")
    _LIBRARIES.append(lib)


_PY_LIBRARY = None
_LIBRARIES: list = []


def _register_fakes() -> None:
    @torch.library.register_fake("qat::quantize_dequantize")
    def _(x, scale, offset, qmax, grad_factor):
        aten.check_encoding(x, scale, offset)
        return torch.empty_like(x)

    @torch.library.register_fake("qat::quantize_dequantize_backward")
    def _(grad, x, scale, offset, qmax, grad_factor, encoding_grads):
        return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(offset)

    @torch.library.register_fake("qat::quantize_dequantize_with_mask")
    def _(x, scale, offset, qmax):
        aten.check_encoding(x, scale, offset)
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake("qat::mask_gradient")
    def _(grad, mask):
        return torch.empty_like(grad)

    if _BACKEND == "cpp":  # the Python definition is CompositeImplicit: traced through, no fake needed
        @torch.library.register_fake("qat::quantize_dequantize_learned")
        def _(x, log_scale, log_floor, offset, qmax, grad_factor, learn_offset):
            return torch.empty_like(x)

        @torch.library.register_fake("qat::quantize_dequantize_float")
        def _(x, scale, mantissa_bits, min_exponent, max_value):
            aten.check_encoding(x, scale, scale.new_zeros(1))
            return torch.empty_like(x)

        @torch.library.register_fake("qat::quantize_dequantize_float_with_mask")
        def _(x, scale, mantissa_bits, min_exponent, max_value):
            aten.check_encoding(x, scale, scale.new_zeros(1))
            return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

        @torch.library.register_fake("qat::quantize_dequantize_float_learned")
        def _(x, log_scale, log_floor, mantissa_bits, min_exponent, max_value, grad_factor):
            aten.check_encoding(x, log_scale, log_scale.new_zeros(1))
            return torch.empty_like(x)

        @torch.library.register_fake("qat::quantize_dequantize_float_learned_backward")
        def _(grad, x, log_scale, log_floor, mantissa_bits, min_exponent, max_value, grad_factor):
            return torch.empty_like(x), torch.empty_like(log_scale)


def backend() -> str:
    """Define the op (once per process) and return which kernels it uses: ``cpp`` or ``python``."""
    global _BACKEND
    if _BACKEND is not None:
        return _BACKEND
    choice = os.environ.get("QAT_FAKE_QUANT_KERNEL", "cpp")
    if choice not in ("cpp", "python"):
        raise ValueError(f"QAT_FAKE_QUANT_KERNEL={choice!r} is not allowed; allowed: cpp, python")
    _BACKEND = "python"
    if choice == "cpp":
        try:
            _build_cpp()
            _BACKEND = "cpp"
        except Exception as exc:  # no compiler, no headers: the ATen-ops definition does the same math
            log.warning("fused fake-quant kernel unavailable (%s: %s); using ATen ops", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
    if _BACKEND == "python":
        _define_python()
    _register_aten()
    _register_fakes()
    from . import triton_kernels

    triton_kernels.register()
    return _BACKEND
