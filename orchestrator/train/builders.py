"""Building a trial's data and pretrained model from its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..zoo.datasets import DataSplits
from ..zoo.pretrained import PretrainRecipe, load_checkpoint, pretrained_baseline
from ..zoo.registry import DATASETS, MODELS, RegistryError, resolve
from .config import DataSpec, ModelSpec, TrialConfigError


def build_data(spec: DataSpec) -> DataSplits:
    """The trial's ``DataSplits`` (built-in by name, or ``_target_(**args)``)."""
    try:
        builder = resolve("data", spec.name, spec._target_, DATASETS)
    except RegistryError as exc:
        raise TrialConfigError(str(exc)) from None
    data = builder(**spec.args)
    if not isinstance(data, DataSplits):
        raise TrialConfigError(f"data builder {spec._target_ or spec.name!r} returned {type(data).__name__}, "
                               "expected orchestrator.zoo.datasets.DataSplits")
    return data


def new_model(spec: ModelSpec, data: DataSplits) -> nn.Module:
    """An untrained model instance; ``num_classes`` comes from the data unless ``args`` sets it."""
    try:
        builder = resolve("model", spec.name, spec._target_, MODELS)
    except RegistryError as exc:
        raise TrialConfigError(str(exc)) from None
    args = dict(spec.args)
    if spec._target_ is None:
        args.setdefault("num_classes", data.num_classes)
    return builder(**args)


def _identity(spec: ModelSpec, data_spec: DataSpec) -> dict[str, Any]:
    return {"model": spec.name, "model_target": spec._target_, "model_args": spec.args,
            "data": data_spec.name, "data_target": data_spec._target_, "data_args": data_spec.args}


def pretrained_path(spec: ModelSpec, data_spec: DataSpec, data: DataSplits, log=print) -> tuple[str, dict]:
    """The FP32 checkpoint for the trial: ``spec.checkpoint``, or the cached baseline (trained once)."""
    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise TrialConfigError(f"model.checkpoint={spec.checkpoint!r}: no such file")
        return str(path), {}
    recipe = PretrainRecipe(spec.pretrain_epochs, spec.pretrain_lr, spec.pretrain_batch_size)
    path, meta = pretrained_baseline(lambda: new_model(spec, data), data, _identity(spec, data_spec), recipe,
                                     spec.cache_dir, log=log)
    return str(path), meta


def load_pretrained(spec: ModelSpec, data: DataSplits, checkpoint: str) -> nn.Module:
    """A model built from ``spec`` holding the weights of ``checkpoint``, in eval mode."""
    model = new_model(spec, data)
    state, _ = load_checkpoint(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise TrialConfigError(f"model.checkpoint={checkpoint!r} does not fit model {spec.name!r}: {first}") from None
    return model.eval()
