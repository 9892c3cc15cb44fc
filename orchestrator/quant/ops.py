"""The vocabulary of functional ops: canonical names and what each kind of op means for placement.

Every torch function, tensor method and operator that reaches the simulation's
``__torch_function__`` handler gets a *canonical name* (``x + y``, ``x.add(y)``, ``torch.add``
and ``x += y`` are all ``add``; ``F.scaled_dot_product_attention`` is ``sdpa``), or None when it
is never a quantization site:

- ``IGNORED``: metadata and conversions to Python (``.shape``, ``.size()``, ``.item()``);
- ``PASS_THROUGH``: ops whose outputs only move, select or repeat input values (views,
  reshapes, indexing, concatenation-free splits, dropout, max pooling): their output is on
  the grid of their input, so they get no quantizer.

Sites are counted per canonical name within one call of the module that runs them, so the
same rule must hold at capture time and at run time: ``canonical_name`` depends on the
function only, never on the data, and ``computes_on_floats`` on the arguments' dtypes only.
Integer and index arithmetic (position ids, ``cumsum`` of a mask, shape arithmetic that a
tracer such as ``torch.export`` turns into tensor ops) takes no float tensor: it is never a
site and is not counted, so ops that appear only while tracing do not shift the keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORED = frozenset({
    "__get__", "__set__", "size", "dim", "ndimension", "numel", "nelement", "__len__", "item", "tolist",
    "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "__str__", "__hash__",
    "__reduce_ex__", "__deepcopy__", "__array__", "__iter__", "__contains__", "is_floating_point", "is_complex",
    "is_contiguous", "is_nonzero", "data_ptr", "element_size", "stride", "storage_offset", "get_device",
    "requires_grad_", "register_hook", "retain_grad", "backward", "__setstate__", "untyped_storage", "storage",
    "has_names", "is_set_to", "is_same_size", "equal", "allclose", "__dlpack__", "numpy", "dim_order",
    "is_inference", "__setitem__", "_is_view", "_base", "record_stream", "pin_memory", "share_memory_",
    "is_pinned", "is_shared", "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "empty_like",
    "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like", "arange", "zeros", "ones",
    "full", "empty", "tensor", "as_tensor", "from_numpy", "eye", "linspace", "logspace", "finfo", "iinfo",
    "manual_seed", "is_tensor", "is_grad_enabled", "broadcast_shapes", "sym_size", "sym_numel",
})

PASS_THROUGH = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "mT", "contiguous", "chunk", "split", "split_with_sizes", "tensor_split", "unbind",
    "narrow", "select", "expand", "expand_as", "repeat", "repeat_interleave", "tile", "getitem", "detach",
    "clone", "to", "type", "type_as", "float", "cpu", "cuda", "movedim", "moveaxis", "swapaxes", "swapdims",
    "flip", "fliplr", "flipud", "roll", "rot90", "gather", "index_select", "take", "take_along_dim",
    "masked_select", "diagonal", "tril", "triu", "as_strided", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "narrow_copy", "align_to", "refine_names",
    "rename", "unfold", "flatten_", "squeeze_", "unsqueeze_", "transpose_", "t_", "as_strided_",
    "detach_", "requires_grad", "broadcast_to", "broadcast_tensors", "atleast_1d", "atleast_2d", "atleast_3d",
    "ravel", "hsplit", "vsplit", "dsplit", "split_with_sizes_copy", "unsafe_split", "unsafe_chunk",
    "T", "mT", "H", "mH", "data", "real",  # properties that return views
    "pad",  # copies values, adds zeros (on every grid) or reflections; exporters fold it into the next conv
})

# Ops that clip below at 0 (or to a fixed range): a producer feeding only one of these is fused with it.
RELU_LIKE = frozenset({"relu", "relu6", "hardtanh"})
# Ops that combine scores with a mask before a softmax: no quantizer between them and the softmax.
MASK_OPS = frozenset({"add", "sub", "where", "masked_fill", "mul"})
SOFTMAX = frozenset({"softmax", "log_softmax"})
ADD = frozenset({"add"})

_OPERATOR_NAMES = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add", "__sub__": "sub", "__rsub__": "sub", "__isub__": "sub",
    "rsub": "sub", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "__truediv__": "div",
    "__rtruediv__": "div", "__itruediv__": "div", "__div__": "div", "__rdiv__": "div", "true_divide": "div",
    "divide": "div", "multiply": "mul", "subtract": "sub", "__matmul__": "matmul", "__rmatmul__": "matmul",
    "__pow__": "pow", "__rpow__": "pow", "__ipow__": "pow", "__neg__": "neg", "negative": "neg",
    "__getitem__": "getitem", "__floordiv__": "floor_divide", "__mod__": "remainder", "__abs__": "abs",
    "scaled_dot_product_attention": "sdpa", "concat": "cat", "concatenate": "cat",
}
# In-place operators rebind the name they assign to (``x += y`` is ``x = x.__iadd__(y)``).
REBINDING_INPLACE = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"})

_CACHE: dict[Callable, str | None] = {}


def raw_name(func: Callable) -> str:
    """``func``'s own name; for a property read (``x.T``, ``x.shape``) the property's name."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def canonical_name(func: Callable) -> str | None:
    """The canonical op name of ``func``, or None when it never holds a quantization site."""
    try:
        return _CACHE[func]
    except (KeyError, TypeError):
        pass
    name = raw_name(func)
    name = _OPERATOR_NAMES.get(name, name)
    if name not in _OPERATOR_NAMES.values() and name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place method: add_ -> add
    name = _OPERATOR_NAMES.get(name, name)
    is_property = raw_name(func) != (getattr(func, "__name__", None) or "")
    out = None if (is_property or name in IGNORED or name in PASS_THROUGH or name.startswith("_")) else name
    try:
        _CACHE[func] = out
    except TypeError:
        pass
    return out


def computes_on_floats(args: tuple, kwargs: dict) -> bool:
    """True when a tensor argument (or one inside a list/tuple argument, ``torch.cat``'s) is floating point."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                return True
        elif isinstance(a, (list, tuple)):
            if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in a):
                return True
    return False


def is_pass_through(func: Callable) -> bool:
    """True for an op whose output values are input values (views, reshapes, dropout, ...)."""
    name = raw_name(func)
    name = _OPERATOR_NAMES.get(name, name)
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name in PASS_THROUGH


def is_inplace(func: Callable) -> bool:
    """True for an in-place method (``x.add_(y)``); the ``x += y`` operators rebind instead."""
    name = raw_name(func)
    return name.endswith("_") and not name.startswith("_") and name not in REBINDING_INPLACE
