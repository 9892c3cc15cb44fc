"""Finding, in an exported ONNX graph, the initializers that hold each quantized parameter.

The exporter does not keep parameters as they are: an ``nn.Linear`` on a 3-D input becomes
``MatMul`` on a constant-folded transposed copy (``val_217``), multi-head attention's
``in_proj_weight`` likewise, an LSTM's gate rows are reordered (PyTorch ``i,f,g,o`` -> ONNX
``i,o,f,c``) and reshaped to ``[1, 4H, in]``, a tied embedding/``lm_head`` table appears once
as itself and once transposed, and initializers of equal value are merged. Names cannot be
trusted, values can: each parameter is looked up by value, as itself, transposed (2-D), or
with its channels (slices along its channel axis) permuted, leading/trailing size-1 dims
ignored. A per-tensor parameter read through a constant index (``table[index]``) is found as
the gathered tensor the exporter folds it into. Each match says which axis of the initializer holds the parameter's channels and in
which order, so a per-channel encoding is written for the tensor the graph really consumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class Located:
    """One initializer holding a parameter's values."""

    initializer: str
    kind: str  # "identity" | "transposed" | "reordered" | "gathered"
    axis: int | None  # the channel axis in the initializer (None: per-tensor parameter)
    order: tuple[int, ...] | None  # initializer channel i holds parameter channel order[i]; None: same order


def _squeezed(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """``shape`` without leading/trailing 1s, and how many leading 1s were dropped."""
    lead = 0
    while lead < len(shape) - 1 and shape[lead] == 1:
        lead += 1
    end = len(shape)
    while end > lead + 1 and shape[end - 1] == 1:
        end -= 1
    return tuple(shape[lead:end]), lead


def _channel_order(param: np.ndarray, candidate: np.ndarray, axis: int) -> tuple[int, ...] | None:
    """The permutation p with ``candidate`` channel i == ``param`` channel p[i] along ``axis``, or None."""
    p = np.moveaxis(param, axis, 0).reshape(param.shape[axis], -1)
    c = np.moveaxis(candidate, axis, 0).reshape(candidate.shape[axis], -1)
    rows: dict[bytes, list[int]] = {}
    for i, row in enumerate(p):
        rows.setdefault(row.tobytes(), []).append(i)
    order = []
    for row in c:
        sources = rows.get(row.tobytes())
        if not sources:
            return None
        order.append(sources.pop(0))
    return tuple(order)


class ParamLocator:
    """Initializers of ``model`` by element count, converted to numpy on first use."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.by_numel: dict[int, list[onnx.TensorProto]] = {}
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                self.by_numel.setdefault(int(np.prod(init.dims, dtype=np.int64)), []).append(init)
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, init: onnx.TensorProto) -> np.ndarray:
        if init.name not in self._arrays:
            self._arrays[init.name] = numpy_helper.to_array(init)
        return self._arrays[init.name]

    def locate_gathered(self, values: np.ndarray, exclude: set[str]) -> list[Located]:
        """Initializers every value of which is a value of ``values`` (a parameter read through a
        constant index, ``table[index]``, which the exporter folds into a new tensor: Swin's
        relative position bias). Only for per-tensor encodings, which such a gather keeps exact.
        Initializers named in ``exclude`` (other tensors of the model) and ones of one repeated
        value (zeros) are not candidates."""
        pool = np.unique(np.asarray(values, dtype=np.float32))
        found = []
        for inits in self.by_numel.values():
            for init in inits:
                if init.name in exclude:
                    continue
                array = self._array(init)
                if array.size < 2 or np.all(array == array.flat[0]) and pool.size > 1:
                    continue
                if np.isin(array, pool).all():
                    found.append(Located(init.name, "gathered", None, None))
        return found

    def locate(self, values: np.ndarray, axis: int | None) -> list[Located]:
        """Every initializer holding ``values`` (a parameter, channels on ``axis``)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        core, lead = _squeezed(values.shape)
        found = []
        for init in self.by_numel.get(values.size, []):
            shape = tuple(init.dims)
            if shape == values.shape and np.array_equal(self._array(init), values):
                found.append(Located(init.name, "identity", axis, None))
                continue
            icore, ilead = _squeezed(shape)
            array = self._array(init).reshape(icore)
            pv = values.reshape(core)
            mapped = None if axis is None else axis - lead  # the channel axis within ``core``
            if mapped is not None and not 0 <= mapped < len(core):
                continue  # the channel axis is a size-1 dim that squeezing dropped
            if icore == core and np.array_equal(array, pv):
                found.append(Located(init.name, "identity", None if axis is None else mapped + ilead, None))
            elif len(core) == 2 and icore == core[::-1] and np.array_equal(array, pv.T):
                found.append(Located(init.name, "transposed", None if axis is None else (1 - mapped) + ilead, None))
            elif icore == core and mapped is not None and 0 <= mapped < len(core):
                order = _channel_order(pv, array, mapped)
                if order is not None:
                    found.append(Located(init.name, "reordered", mapped + ilead, order))
        return found
