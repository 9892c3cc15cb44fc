"""Triton kernels of ``qat::quantize_dequantize`` and the float ops for CUDA tensors (registered when
Triton imports).

Same contract as ``fake_quant.cpp``: ``x_hat = s * clamp(round(x / s), o, o + qmax)``, or for the
scaled float formats ``s * cast(clamp(x / s, -max, max))`` (``_grid``: the float32 exponent bits give
the grid step, as the C++ ``FloatGrid``), with an IEEE division (``tl.div_rn``; Triton's ``/`` may
be approximate on GPU) and round half to even written out exactly (``floor``, then up when the
remainder is above 1/2 or exactly 1/2 with an odd floor), so the kernels need no libdevice and
also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests check them on machines
without a GPU.

Layout: ``scale`` in ``reference.py``'s layout; the wrapper views a contiguous ``x`` as
``[outer, C, inner]`` (``granularity.scale_runs``: per tensor, per channel on any axis, blocks along
the last dim or along axis 1 of a conv weight, per token), rows of ``inner`` elements under one scale
element (``c = row % C``; per tensor: ``C = 1``). Layouts whose scale-indexed dims do not form one run
go to ``aten.py`` (the reference's ATen ops). Forward and the plain backward are elementwise.
The forward can also write the STE's mask (``quantize_dequantize_with_mask``). The backward with
encoding gradients gives each row one program that writes its partial sums, which a second
kernel reduces per channel in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch

from .. import reference
from ..granularity import scale_runs
from . import aten
from .aten import in_layout_of

try:  # Triton is optional: without it CUDA tensors run the ATen-ops kernels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

BLOCK = 1024
PER_TENSOR_ROW = 1 << 16  # per-tensor encoding-gradient backward: rows of this many elements


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _round_half_even(u):
        f = tl.floor(u)
        d = u - f
        up = (d > 0.5) | ((d == 0.5) & ((f - 2.0 * tl.floor(f * 0.5)) != 0.0))
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _grid(u, lo, qmax, fmax, mbits, min_biased, FLOAT: tl.constexpr):
        """``(c, inside)`` on the format's grid (``fake_quant.cpp``'s ``IntGrid`` / ``FloatGrid``): integer
        ``clamp(round(u), lo, lo + qmax)``; float ``u`` clamped to ``[-fmax, fmax]`` and rounded to
        ``mbits`` mantissa bits at its float32 exponent (at least ``min_biased``), ties to even."""
        if FLOAT:
            inside = tl.abs(u) <= fmax
            clipped = tl.minimum(tl.maximum(u, -fmax), fmax)
            e = tl.maximum((clipped.to(tl.int32, bitcast=True) >> 23) & 0xFF, min_biased)
            up = ((254 + mbits - e) << 23).to(tl.float32, bitcast=True)
            step = ((e - mbits) << 23).to(tl.float32, bitcast=True)
            c = _round_half_even(clipped * up) * step
        else:
            r = _round_half_even(u)
            inside = (r >= lo) & (r <= lo + qmax)
            c = tl.minimum(tl.maximum(r, lo), lo + qmax)
        return c, inside

    @triton.jit
    def _forward_kernel(x_ptr, y_ptr, m_ptr, s_ptr, o_ptr, n, inner, channels, qmax, fmax, mbits, min_biased,
                        BLOCK_SIZE: tl.constexpr, WITH_MASK: tl.constexpr, FLOAT: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        c = (offs // inner) % channels
        s = tl.load(s_ptr + c, mask=mask, other=1.0)
        lo = tl.load(o_ptr + c, mask=mask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q, inside = _grid(tl.div_rn(x, s), lo, qmax, fmax, mbits, min_biased, FLOAT)
        tl.store(y_ptr + offs, (q * s).to(y_ptr.dtype.element_ty), mask=mask)
        if WITH_MASK:
            tl.store(m_ptr + offs, inside.to(tl.int8), mask=mask)

    @triton.jit
    def _backward_kernel(g_ptr, x_ptr, gx_ptr, s_ptr, o_ptr, n, inner, channels, qmax, fmax, mbits, min_biased,
                         BLOCK_SIZE: tl.constexpr, FLOAT: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        c = (offs // inner) % channels
        s = tl.load(s_ptr + c, mask=mask, other=1.0)
        lo = tl.load(o_ptr + c, mask=mask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        _, keep = _grid(tl.div_rn(x, s), lo, qmax, fmax, mbits, min_biased, FLOAT)
        tl.store(gx_ptr + offs, tl.where(keep, g, 0.0), mask=mask)

    @triton.jit
    def _backward_encoding_kernel(g_ptr, x_ptr, gx_ptr, s_ptr, o_ptr, ps_ptr, po_ptr, row_len, n, channels, qmax,
                                  fmax, mbits, min_biased, BLOCK_SIZE: tl.constexpr, FLOAT: tl.constexpr):
        row = tl.program_id(0)
        c = row % channels
        s = tl.load(s_ptr + c)
        lo = tl.load(o_ptr + c)
        acc_s = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        start = row * row_len
        for k in range(0, row_len, BLOCK_SIZE):
            offs = start + k + tl.arange(0, BLOCK_SIZE)
            mask = (offs < start + row_len) & (offs < n)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.div_rn(x, s)
            clipped, keep = _grid(u, lo, qmax, fmax, mbits, min_biased, FLOAT)
            g_in = tl.where(keep, g, 0.0)
            tl.store(gx_ptr + offs, g_in, mask=mask)
            acc_s += g_in * (clipped - u) + (g - g_in) * clipped  # no cancellation of g*r against g*u
            acc_o += g - g_in
        tl.store(ps_ptr + row, tl.sum(acc_s, axis=0))
        tl.store(po_ptr + row, tl.sum(acc_o, axis=0))

    @triton.jit
    def _finish_kernel(ps_ptr, po_ptr, s_ptr, gs_ptr, go_ptr, rows, channels, grad_factor, BLOCK_SIZE: tl.constexpr):
        """Channel ``c``'s encoding gradients from the partial sums of its rows ``c, c + C, ...``, in
        float64 and a fixed order; the offset's times ``s``; both times ``grad_factor``."""
        c = tl.program_id(0)
        acc_s = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        acc_o = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        for k in range(0, rows, BLOCK_SIZE * channels):
            r = c + k + tl.arange(0, BLOCK_SIZE) * channels
            acc_s += tl.load(ps_ptr + r, mask=r < rows, other=0.0).to(tl.float64)
            acc_o += tl.load(po_ptr + r, mask=r < rows, other=0.0).to(tl.float64)
        tl.store(gs_ptr + c, (tl.sum(acc_s, axis=0) * grad_factor).to(tl.float32))
        tl.store(go_ptr + c, (tl.sum(acc_o, axis=0) * tl.load(s_ptr + c).to(tl.float64) * grad_factor).to(tl.float32))


def _encoding(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """``(inner, C, scale, offset)`` for the kernels (float32, ``[C]`` each), or None when the layout is
    not one run (``granularity.scale_runs``)."""
    aten.check_encoding(x, scale, offset)
    runs = scale_runs(tuple(x.shape), tuple(scale.shape))
    if runs is None:
        return None
    _, channels, inner = runs
    s = scale.float().reshape(-1).contiguous()
    o = offset.float().reshape(-1).expand(s.shape).contiguous()  # one offset for every scale element
    return max(inner, 1), channels, s, o


def _dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill one block of memory, in any dim order (channels-last included)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: torch.Tensor, scale: torch.Tensor) -> bool:
    """One encoding on dense memory: processed as flat memory in whatever layout it has."""
    return scale.numel() == 1 and _dense(t)


def int_grid(qmax: int) -> tuple:
    """The kernels' grid arguments ``(FLOAT, qmax, fmax, mbits, min_biased)`` of an integer grid."""
    return False, float(qmax), 0.0, 0, 0


def float_grid(mantissa_bits: int, min_exponent: int, max_value: float) -> tuple:
    """... of a scaled float format (the float ops' arguments; ``min_biased``: float32's biased exponent)."""
    return True, 0.0, float(max_value), int(mantissa_bits), int(min_exponent) + 127


def _forward(x_in: torch.Tensor, scale: torch.Tensor, enc, grid: tuple,
             with_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = x_in if _flat(x_in, scale) else x_in.contiguous()
    y = torch.empty_like(x)
    inside = torch.empty_like(x, dtype=torch.bool) if with_mask else None
    n = x.numel()
    if n:
        inner, channels, s, o = enc
        mask_out = inside.view(torch.int8) if with_mask else y  # not written without the mask
        _forward_kernel[(triton.cdiv(n, BLOCK),)](x, y, mask_out, s, o, n, inner, channels, *grid[1:],
                                                  BLOCK_SIZE=BLOCK, WITH_MASK=with_mask, FLOAT=grid[0])
    return in_layout_of(x_in, y), (in_layout_of(x_in, inside) if with_mask else None)


def forward(x_in: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int,
            grad_factor: float) -> torch.Tensor:
    enc = _encoding(x_in, scale, offset)
    if enc is None:
        return aten.forward(x_in, scale, offset, qmax, grad_factor)
    return _forward(x_in, scale, enc, int_grid(qmax), with_mask=False)[0]


def forward_with_mask(x_in: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward and the STE's mask (bool, True where ``round(x / s)`` is on the grid)."""
    enc = _encoding(x_in, scale, offset)
    if enc is None:
        return aten.forward_with_mask(x_in, scale, offset, qmax)
    return _forward(x_in, scale, enc, int_grid(qmax), with_mask=True)


def _backward(grad_in: torch.Tensor, x_in: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, enc,
              grid: tuple, grad_factor: float,
              encoding_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = _flat(x_in, scale) and grad_in.stride() == x_in.stride()
    x, grad = (x_in, grad_in) if flat else (x_in.contiguous(), grad_in.contiguous())
    gx = torch.empty_like(grad)
    n = x.numel()
    inner, channels, s, o = enc
    if n == 0 or not encoding_grads:
        if n:
            _backward_kernel[(triton.cdiv(n, BLOCK),)](grad, x, gx, s, o, n, inner, channels, *grid[1:],
                                                       BLOCK_SIZE=BLOCK, FLOAT=grid[0])
        return in_layout_of(x_in, gx), torch.zeros_like(scale), torch.zeros_like(offset)
    row_len = PER_TENSOR_ROW if channels == 1 else inner
    rows = triton.cdiv(n, row_len)
    ps = torch.empty(rows, device=x.device, dtype=torch.float32)
    po = torch.empty(rows, device=x.device, dtype=torch.float32)
    _backward_encoding_kernel[(rows,)](grad, x, gx, s, o, ps, po, row_len, n, channels, *grid[1:],
                                       BLOCK_SIZE=BLOCK, FLOAT=grid[0])
    gs, go = torch.empty_like(s), torch.empty_like(s)
    _finish_kernel[(channels,)](ps, po, s, gs, go, rows, channels, float(grad_factor), BLOCK_SIZE=256)
    if offset.numel() == 1:  # one offset for every scale element
        go = go.sum()
    return in_layout_of(x_in, gx), gs.to(scale.dtype).reshape(scale.shape), go.to(offset.dtype).reshape(offset.shape)


def backward(grad_in: torch.Tensor, x_in: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int,
             grad_factor: float, encoding_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = _encoding(x_in, scale, offset)
    if enc is None:
        return aten.backward(grad_in, x_in, scale, offset, qmax, grad_factor, encoding_grads)
    return _backward(grad_in, x_in, scale, offset, enc, int_grid(qmax), grad_factor, encoding_grads)


# ---------------------------------------------------------------- the float ops (``cpp`` backend)
# The float grid reads no offset: the scale stands in for the kernels' offset argument (no zeros
# tensor allocated and filled per call).
def float_forward_with_mask(x_in: torch.Tensor, scale: torch.Tensor, mantissa_bits: int, min_exponent: int,
                            max_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    aten.float_format(mantissa_bits, min_exponent, max_value)  # one clear error for anything else
    enc = _encoding(x_in, scale, scale)
    if enc is None:
        return aten.float_forward_with_mask(x_in, scale, mantissa_bits, min_exponent, max_value)
    return _forward(x_in, scale, enc, float_grid(mantissa_bits, min_exponent, max_value), with_mask=True)


def float_forward(x_in: torch.Tensor, scale: torch.Tensor, mantissa_bits: int, min_exponent: int,
                  max_value: float) -> torch.Tensor:
    aten.float_format(mantissa_bits, min_exponent, max_value)
    enc = _encoding(x_in, scale, scale)
    if enc is None:
        return aten.float_forward(x_in, scale, mantissa_bits, min_exponent, max_value)
    return _forward(x_in, scale, enc, float_grid(mantissa_bits, min_exponent, max_value), with_mask=False)[0]


def _learned_scale(log_scale: torch.Tensor, log_floor: torch.Tensor) -> torch.Tensor:
    return reference.learned_encoding(log_scale, log_floor, log_scale, 0, False)[0]  # (offset unused)


def float_learned_forward(x_in: torch.Tensor, log_scale: torch.Tensor, log_floor: torch.Tensor, mantissa_bits: int,
                          min_exponent: int, max_value: float, grad_factor: float) -> torch.Tensor:
    return float_forward(x_in, _learned_scale(log_scale, log_floor), mantissa_bits, min_exponent, max_value)


def float_learned_backward(grad_in: torch.Tensor, x_in: torch.Tensor, log_scale: torch.Tensor,
                           log_floor: torch.Tensor, mantissa_bits: int, min_exponent: int, max_value: float,
                           grad_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dlog_scale = s * dL/ds)``, the sums per scale element as the integer backward's."""
    aten.float_format(mantissa_bits, min_exponent, max_value)
    scale = _learned_scale(log_scale, log_floor)
    enc = _encoding(x_in, scale, scale)
    if enc is None:
        return aten.float_learned_backward(grad_in, x_in, log_scale, log_floor, mantissa_bits, min_exponent,
                                           max_value, grad_factor)
    gx, gs, _ = _backward(grad_in, x_in, scale, scale, enc, float_grid(mantissa_bits, min_exponent, max_value),
                          grad_factor, True)
    return gx, gs * scale


def register() -> bool:
    """Use these kernels for CUDA tensors; False when Triton or CUDA is missing."""
    if triton is None or not torch.cuda.is_available():
        return False
    torch.library.register_kernel("qat::quantize_dequantize", "cuda", forward)
    torch.library.register_kernel("qat::quantize_dequantize_backward", "cuda", backward)
    torch.library.register_kernel("qat::quantize_dequantize_with_mask", "cuda", forward_with_mask)
    if hasattr(torch.ops.qat, "quantize_dequantize_float"):  # defined by the cpp backend only
        torch.library.register_kernel("qat::quantize_dequantize_float", "cuda", float_forward)
        torch.library.register_kernel("qat::quantize_dequantize_float_with_mask", "cuda", float_forward_with_mask)
        torch.library.register_kernel("qat::quantize_dequantize_float_learned", "cuda", float_learned_forward)
        torch.library.register_kernel("qat::quantize_dequantize_float_learned_backward", "cuda",
                                      float_learned_backward)
    return True
