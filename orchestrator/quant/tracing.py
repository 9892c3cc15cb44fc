"""Tracing a model into a torch.fx graph, with an error that names the op fx cannot trace."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch import fx, nn

from .errors import UntraceableModelError

_TORCH_DIR = str(Path(torch.__file__).parent)


class _Tracer(fx.Tracer):
    """fx.Tracer that keeps ``leaf_modules`` opaque and remembers which module it was in."""

    def __init__(self, leaf_modules: tuple[str, ...]) -> None:
        super().__init__()
        self.leaf_modules = set(leaf_modules)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_modules or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost traceback frame outside PyTorch, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if not f.filename.endswith(("tracing.py",))]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def trace(model: nn.Module, leaf_modules: tuple[str, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; raise ``UntraceableModelError`` with the way out on failure."""
    known = {name for name, _ in model.named_modules()}
    missing = [name for name in leaf_modules if name not in known]
    if missing:
        raise UntraceableModelError(
            f"leaf_modules names {missing} that are not submodules of {type(model).__name__}; "
            f"allowed: qualified names such as {sorted(n for n in known if n)[:5]}"
        )
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... depending on the op
        where = _user_frame(exc)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        inside = tracer.failed_in
        if inside:
            way_out = (
                f"QuantConfig(leaf_modules=['{inside}']) runs that submodule untraced (its output is "
                "quantized, its internals and weights stay float), or rewrite its forward without "
                "data-dependent Python control flow"
            )
            location = f"in submodule '{inside}'"
        else:
            way_out = (
                "rewrite the model's own forward without data-dependent Python control flow, or move "
                "that code into a submodule and name it in QuantConfig(leaf_modules=[...])"
            )
            location = f"in {type(model).__name__}.forward"
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__} {location}"
            + (f" at {where}" if where else "")
            + f": {reason}. Way out: {way_out}"
        ) from exc
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
