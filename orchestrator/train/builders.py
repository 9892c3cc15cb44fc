"""Building a trial's data, task and pretrained model from its config."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from ..tasks import TASKS, Task, build_task
from ..zoo.datasets import DataSplits
from ..zoo.pretrained import CheckpointError, PretrainRecipe, load_checkpoint, pretrained_baseline
from ..zoo.registry import DATASETS, MODELS, RegistryError, resolve
from .config import DataSpec, ModelSpec, TaskSpec, TrialConfigError


def build_data(spec: DataSpec) -> DataSplits:
    """The trial's ``DataSplits`` (built-in by name, or ``_target_(**args)``)."""
    try:
        builder = resolve("data", spec.name, spec._target_, DATASETS)
    except RegistryError as exc:
        raise TrialConfigError(str(exc)) from None
    try:
        data = builder(**spec.args)
    except TypeError as exc:
        raise TrialConfigError(f"data.args={spec.args!r} do not fit {spec._target_ or spec.name!r}: {exc}") from None
    if not isinstance(data, DataSplits):
        raise TrialConfigError(f"data builder {spec._target_ or spec.name!r} returned {type(data).__name__}, "
                               "expected orchestrator.zoo.datasets.DataSplits")
    return data


def task_of(spec: TaskSpec) -> Task:
    """The trial's ``Task`` (built-in by name, or ``_target_(**args)``)."""
    try:
        return build_task(spec.name, spec._target_, spec.args)
    except RegistryError as exc:
        raise TrialConfigError(str(exc)) from None


def _accepted(builder: Any, names: list[str]) -> set[str]:
    """Which of ``names`` the callable ``builder`` takes as named parameters."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n in names if n in params and params[n].kind in kinds}


def _config_class(builder: Any) -> Any:
    """A ``transformers`` model class's config class (``LlamaForCausalLM`` -> ``LlamaConfig``), or None."""
    config_class = getattr(builder, "config_class", None) if inspect.isclass(builder) else None
    return config_class if inspect.isclass(config_class) and hasattr(config_class, "to_dict") else None


def new_model(spec: ModelSpec, data: DataSplits) -> nn.Module:
    """An untrained model instance: ``model.args``, plus the data's ``model_args`` (``num_classes``,
    ``vocab_size``, ...) that the builder names and ``model.args`` does not set. A ``transformers``
    model class at ``_target_`` (``transformers.LlamaForCausalLM``) is built from its config class
    called with those arguments (``model.args.hidden_size=64``)."""
    try:
        builder = resolve("model", spec.name, spec._target_, MODELS)
    except RegistryError as exc:
        raise TrialConfigError(str(exc)) from None
    config_class = _config_class(builder)
    args = dict(spec.args)
    for name in _accepted(config_class or builder, list(data.model_args)):
        args.setdefault(name, data.model_args[name])
    try:
        if config_class is not None:
            return builder(config_class(**args))
        return builder(**args)
    except TypeError as exc:
        raise TrialConfigError(f"model.args={spec.args!r} do not fit {spec._target_ or spec.name!r}: {exc}") from None


def _with_defaults(kind: str, name: str, target: str | None, args: dict[str, Any], table: dict) -> dict[str, Any]:
    """``args`` completed with the builder's own defaults, so that a changed default (more samples,
    a wider model) is a different baseline, not a stale cache hit."""
    try:
        bound = inspect.signature(resolve(kind, name, target, table)).bind_partial(**args)
    except (RegistryError, TypeError, ValueError):
        return dict(args)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if not isinstance(v, dict) or k in args}


def _identity(spec: ModelSpec, data_spec: DataSpec, task_spec: TaskSpec) -> dict[str, Any]:
    return {"model": spec.name, "model_target": spec._target_,
            "model_args": _with_defaults("model", spec.name, spec._target_, spec.args, MODELS),
            "data": data_spec.name, "data_target": data_spec._target_,
            "data_args": _with_defaults("data", data_spec.name, data_spec._target_, data_spec.args, DATASETS),
            "task": task_spec.name, "task_target": task_spec._target_,
            "task_args": _with_defaults("task", task_spec.name, task_spec._target_, task_spec.args, TASKS)}


def pretrained_path(spec: ModelSpec, data_spec: DataSpec, task_spec: TaskSpec, data: DataSplits,
                    log=print) -> tuple[str, dict]:
    """The FP32 checkpoint for the trial: ``spec.checkpoint``, or the cached baseline (trained once
    with the trial's task and the ``pretrain_*`` recipe)."""
    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser().resolve()
        if path.is_dir():
            raise TrialConfigError(f"model.checkpoint={spec.checkpoint!r} is a directory; give the state_dict file "
                                   "in it")
        if not path.is_file():
            raise TrialConfigError(f"model.checkpoint={spec.checkpoint!r}: no such file")
        return str(path), {}
    from .pretrain import train_fp32

    new_model(spec, data)  # its arguments fit, before any training starts
    task = task_of(task_spec)
    recipe = PretrainRecipe(spec.pretrain_epochs, spec.pretrain_lr, spec.pretrain_batch_size,
                            spec.pretrain_weight_decay)
    path, meta = pretrained_baseline(lambda: new_model(spec, data),
                                     lambda model: train_fp32(model, data, task, recipe, workers=data_spec.loader_workers),
                                     _identity(spec, data_spec, task_spec), recipe, spec.cache_dir, log=log)
    return str(path), meta


def load_pretrained(spec: ModelSpec, data: DataSplits, checkpoint: str) -> nn.Module:
    """A model built from ``spec`` holding the weights of ``checkpoint``, in eval mode."""
    model = new_model(spec, data)
    try:
        state, _ = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise TrialConfigError(f"model.checkpoint: {exc}") from None
    misfit = state_dict_misfit(model.state_dict(), state)
    if misfit:
        raise TrialConfigError(f"model.checkpoint={checkpoint!r} does not fit model {spec.name!r}: {misfit}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise TrialConfigError(f"model.checkpoint={checkpoint!r} does not fit model {spec.name!r}: {first}") from None
    return model.eval()


def state_dict_misfit(expected: dict[str, Any], given: dict[str, Any], shown: int = 3) -> str:
    """What keeps ``given`` from loading where ``expected`` is: missing and unexpected keys and
    shape mismatches, the first ``shown`` of each with their counts; empty when it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches (checkpoint vs model)", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > shown else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:shown])}{more}")
    return "; ".join(parts)
