"""The reference quantize-dequantize: every format and granularity in readable ATen ops.

This is the numerics contract; the fused int op (``kernels/``: C++ CPU, Triton CUDA; elsewhere
these very functions) takes the same scale layout and is tested bit-for-bit against it on integer
formats at every granularity (``tests/quant/test_kernels.py``).

Shapes. ``x``: any float tensor. ``scale``/``offset``: one element (per tensor), or the rank of
``x`` with every dim dividing ``x``'s (``granularity.py``): element ``x[i]`` uses
``scale[i // B]``, ``B = x.shape / scale.shape`` per dim (per channel ``[1, C, 1, 1]``, per block
``[C_out, K / 32]``, per token ``[..., 1]``). ``offset`` has the scale's shape or one element.
Arithmetic in float32 (``x`` is upcast; the result has ``x``'s dtype); blocks are broadcast by
reshaping, never by copying the scale to ``x``'s size.

Integer formats (``IntFormat``, AIMET/ONNX ``QuantizeLinear``; ``o`` an integer, ``qmax = 2^b - 1``):

    u = x / s                         true float32 division
    c = clamp(round(u), o, o + qmax)  round half to even
    x_hat = s * c

Float formats (``FloatFormat``; ``M`` the format's largest finite value):

    u = x / s
    c = cast(clamp(u, -M, M))         round to nearest, ties to even, subnormals kept
    x_hat = s * c

``cast`` is torch's own conversion where torch has the dtype (float8_e4m3fn, float8_e5m2, float16,
bfloat16) and ``round_minifloat`` otherwise (float4_e2m1): with ``e = max(floor(log2|u|), 1 - bias)``
the grid step around ``u`` is ``2^(e - m)``, and ``c = step * round(u / step)`` (exact: the step is
a power of two). Unscaled casts (fp16/bf16) have ``s = 1`` and no clamp (beyond the range: inf).

Backward (clipped straight-through estimator; LSQ/LSQ+ for learned encodings), ``inside`` where
the value was not clipped (int: ``o <= round(u) <= o + qmax``; float: ``|u| <= M``):

    dL/dx = g * inside
    dL/ds = sum over the block of g * (c - inside * u)      times grad_factor
    dL/do = sum over the block of g * (1 - inside) * s      times grad_factor (int only)

As one op, ``torch.ops.qat.quantize_dequantize_general(x, scale, offset, fmt, qmax, grad_factor)``
(``fmt``: ``"int"`` or a ``formats.FORMATS`` name), so ``torch.compile`` sees one opaque node per
quantizer call and encodings changing never recompile.
"""

from __future__ import annotations

import math

import torch

from .formats import FORMATS, FloatFormat, Format, IntFormat
from .granularity import block_view


def round_minifloat(u: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``u`` (float32, within ``[-max, max]``) rounded to the nearest value of ``fmt``, ties to even.

    ``frexp`` gives ``|u| = f * 2^k`` with ``f in [0.5, 1)``, so ``floor(log2|u|) = k - 1`` exactly
    (``log2`` in float32 can round up just below a power of two). Below the smallest normal
    exponent the step stays that of the subnormals, ``2^(1 - bias - m)``."""
    _, k = torch.frexp(u)
    exponent = (k - 1).clamp(min=fmt.min_normal_exponent)
    step = torch.exp2((exponent - fmt.mantissa_bits).to(u.dtype))
    return torch.round(u / step) * step


def cast_to(u: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``u`` rounded to ``fmt``'s grid (torch's conversion where it has the dtype), as float32."""
    if fmt.torch_dtype is not None:
        return u.to(fmt.torch_dtype).to(u.dtype)
    return round_minifloat(u, fmt)


def _views(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """``x``, ``scale``, ``offset`` reshaped so the scale broadcasts over its blocks, and the block dims."""
    if scale.numel() == 1:
        return x, scale.reshape(()), offset.reshape(()), None
    x_view, s_view, dims = block_view(tuple(x.shape), tuple(scale.shape))
    o = offset.reshape(s_view) if offset.numel() == scale.numel() else offset.reshape(())
    return x.reshape(x_view), scale.reshape(s_view), o, dims


def _parts(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, fmt: Format):
    """``(u, c, inside, s, o, dims)`` of the formulas in the module docstring, in the block view."""
    xv, s, o, dims = _views(x, scale, offset)
    s = s.float()
    u = xv.float() / s
    if isinstance(fmt, IntFormat):
        o = o.float()
        r = torch.round(u)
        hi = o + fmt.qmax
        c = torch.minimum(torch.maximum(r, o), hi)
        inside = (r >= o) & (r <= hi)
    elif fmt.scaled:
        inside = u.abs() <= fmt.max
        c = cast_to(u.clamp(-fmt.max, fmt.max), fmt)
    else:
        inside = torch.ones_like(u, dtype=torch.bool)
        c = cast_to(u, fmt)
    return u, c, inside, s, o, dims


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``s * Q(x / s)`` for format ``fmt`` (module docstring); no autograd of its own."""
    _, c, _, s, _, _ = _parts(x, scale, offset, fmt)
    return (c * s).reshape(x.shape).to(x.dtype)


def quantize_dequantize_with_mask(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                                  fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_dequantize`` and ``inside`` (bool, ``x``'s shape): where the value was not clipped."""
    _, c, inside, s, _, _ = _parts(x, scale, offset, fmt)
    return (c * s).reshape(x.shape).to(x.dtype), inside.reshape(x.shape)


def quantize_dequantize_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                                 fmt: Format, grad_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/ds, dL/do)`` of the module docstring; the last two have the shapes of ``scale``/``offset``."""
    u, c, inside, s, _, dims = _parts(x, scale, offset, fmt)
    g = grad.reshape(u.shape).float()
    gx = torch.where(inside, g, 0.0)

    def per_scale(t: torch.Tensor) -> torch.Tensor:
        if dims is None:
            return t.sum()
        return t.sum(dim=dims, keepdim=True) if dims else t

    gs = per_scale(g * c - gx * u) * grad_factor
    if isinstance(fmt, IntFormat):
        go = per_scale(g - gx) * s * grad_factor
        go = go.reshape(offset.shape) if offset.numel() == scale.numel() else go.sum().reshape(offset.shape)
    else:
        go = torch.zeros_like(offset)
    return gx.reshape(x.shape).to(grad.dtype), gs.reshape(scale.shape).to(scale.dtype), go.to(offset.dtype)


def format_of(fmt: str, qmax: int) -> Format:
    """The format an op call names: ``"int"`` (with ``qmax = 2^b - 1``) or a ``FORMATS`` name."""
    if fmt == "int":
        return IntFormat((qmax + 1).bit_length() - 1, True)  # symmetry is carried by the offset
    return FORMATS[fmt]


# ---------------------------------------------------------------------------- the op
@torch.library.custom_op("qat::quantize_dequantize_general", mutates_args=())
def quantize_dequantize_general(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, fmt: str, qmax: int,
                                grad_factor: float) -> torch.Tensor:
    """``quantize_dequantize`` as one op (module docstring)."""
    return quantize_dequantize(x, scale, offset, format_of(fmt, qmax))


@quantize_dequantize_general.register_fake
def _(x, scale, offset, fmt, qmax, grad_factor):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, scale, offset, fmt, qmax, grad_factor = inputs
    ctx.save_for_backward(x, scale, offset)
    ctx.args = (fmt, qmax, grad_factor)


def _backward(ctx, grad):
    x, scale, offset = ctx.saved_tensors
    fmt, qmax, grad_factor = ctx.args
    gx, gs, go = quantize_dequantize_backward(grad, x, scale, offset, format_of(fmt, qmax), grad_factor)
    need_s, need_o = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    return gx, (gs if need_s else None), (go if need_o else None), None, None, None


quantize_dequantize_general.register_autograd(_backward, setup_context=_setup)


def learned_encoding(log_scale: torch.Tensor, log_floor: torch.Tensor, offset: torch.Tensor, qmax: int,
                     learn_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Range learning's encoding: ``s = exp(max(log_scale, log_floor))`` (at most ``SCALE_CEIL``) and,
    with ``learn_offset``, the offset rounded and clamped to ``[-qmax, 0]``. Both straight through
    in the backward pass (``quantize_dequantize_general_learned``)."""
    from .encoding import SCALE_CEIL

    scale = torch.exp(torch.clamp(torch.maximum(log_scale, log_floor), max=math.log(SCALE_CEIL)))
    return scale, (torch.round(offset).clamp(-float(qmax), 0.0) if learn_offset else offset)


@torch.library.custom_op("qat::quantize_dequantize_general_learned", mutates_args=())
def quantize_dequantize_general_learned(x: torch.Tensor, log_scale: torch.Tensor, log_floor: torch.Tensor,
                                        offset: torch.Tensor, fmt: str, qmax: int, grad_factor: float,
                                        learn_offset: bool) -> torch.Tensor:
    """The op with range learning's encoding computed inside it (``learned_encoding``), so a learned
    quantizer is one op under compile too and its ``exp`` is the eager one."""
    scale, offset = learned_encoding(log_scale, log_floor, offset, qmax, learn_offset)
    return quantize_dequantize(x, scale, offset, format_of(fmt, qmax))


@quantize_dequantize_general_learned.register_fake
def _(x, log_scale, log_floor, offset, fmt, qmax, grad_factor, learn_offset):
    return torch.empty_like(x)


def _setup_learned(ctx, inputs, output):
    x, log_scale, log_floor, offset, fmt, qmax, grad_factor, learn_offset = inputs
    ctx.save_for_backward(x, log_scale, log_floor, offset)
    ctx.args = (fmt, qmax, grad_factor, learn_offset)


def _backward_learned(ctx, grad):
    """d/d log_scale = s * dL/ds; the floor, ceiling and offset rounding pass gradients straight through."""
    x, log_scale, log_floor, offset = ctx.saved_tensors
    fmt, qmax, grad_factor, learn_offset = ctx.args
    scale, used_offset = learned_encoding(log_scale, log_floor, offset, qmax, learn_offset)
    gx, gs, go = quantize_dequantize_backward(grad, x, scale, used_offset, format_of(fmt, qmax), grad_factor)
    return gx, gs * scale, None, (go if ctx.needs_input_grad[3] else None), None, None, None, None


quantize_dequantize_general_learned.register_autograd(_backward_learned, setup_context=_setup_learned)


@torch.library.custom_op("qat::quantize_dequantize_lpbq_learned", mutates_args=())
def quantize_dequantize_lpbq_learned(x: torch.Tensor, log_scale: torch.Tensor, log_floor: torch.Tensor,
                                     block_int: torch.Tensor, offset: torch.Tensor, fmt: str, qmax: int,
                                     grad_factor: float) -> torch.Tensor:
    """Learned LPBQ as one op: ``s = exp(log_scale) * block_int`` (the per-channel float scale,
    floored as ``learned_encoding``, times the integer block scales; ``log_scale`` broadcasts over
    the blocks), then the reference quantize-dequantize. The product is the one a reader of the
    encodings file computes, and the ``exp`` is the eager one under compile too."""
    scale, _ = learned_encoding(log_scale, log_floor, offset, qmax, False)
    return quantize_dequantize(x, scale * block_int, offset, format_of(fmt, qmax))


@quantize_dequantize_lpbq_learned.register_fake
def _(x, log_scale, log_floor, block_int, offset, fmt, qmax, grad_factor):
    return torch.empty_like(x)


def _setup_lpbq(ctx, inputs, output):
    x, log_scale, log_floor, block_int, offset, fmt, qmax, grad_factor = inputs
    ctx.save_for_backward(x, log_scale, log_floor, block_int, offset)
    ctx.args = (fmt, qmax, grad_factor)


def _backward_lpbq(ctx, grad):
    """d/d log_scale = sum over the channel's blocks of s_b * dL/ds_b (floor straight through)."""
    x, log_scale, log_floor, block_int, offset = ctx.saved_tensors
    fmt, qmax, grad_factor = ctx.args
    scale_c, _ = learned_encoding(log_scale, log_floor, offset, qmax, False)
    scale = scale_c * block_int
    gx, gs, _ = quantize_dequantize_backward(grad, x, scale, offset, format_of(fmt, qmax), grad_factor)
    dims = [d for d in range(gs.dim()) if log_scale.shape[d] == 1 and gs.shape[d] > 1]
    g_log = (gs * scale).sum(dim=dims, keepdim=True) if dims else gs * scale
    return gx, g_log.reshape(log_scale.shape), None, None, None, None, None, None


quantize_dequantize_lpbq_learned.register_autograd(_backward_lpbq, setup_context=_setup_lpbq)


def fake_quantize_general(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, fmt: Format,
                          grad_factor: float = 1.0) -> torch.Tensor:
    """Call the op for ``fmt`` with a full-rank (or one-element) ``scale``/``offset``."""
    return torch.ops.qat.quantize_dequantize_general(x, scale, offset, fmt.name, fmt.qmax, grad_factor)
