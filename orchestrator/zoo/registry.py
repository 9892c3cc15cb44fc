"""Resolving models and datasets by built-in name or by ``_target_`` (a dotted import path)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from . import datasets, hf_models, mnist1d, models, python_text, token_data

MODELS: dict[str, Callable[..., Any]] = {
    "mnist1d_cnn": models.Mnist1dCNN,
    "digits_cnn": models.DigitsCNN,
    "resnet_cifar": models.ResNetCifar,
    "bert_tiny": hf_models.bert_tiny,
    "gpt2_tiny": hf_models.gpt2_tiny,
    "llama_tiny": hf_models.llama_tiny,
}
DATASETS: dict[str, Callable[..., Any]] = {
    "mnist1d": mnist1d.mnist1d,
    "digits": datasets.digits,
    "synthetic": datasets.synthetic,
    "majority_tokens": token_data.majority_tokens,
    "markov_text": token_data.markov_text,
    "python_text": python_text.python_text,
}


class RegistryError(ValueError):
    """A model or dataset name / _target_ that cannot be resolved."""


def import_target(target: str) -> Callable[..., Any]:
    """The object at dotted path ``target`` (``package.module.Name``)."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise RegistryError(f"_target_={target!r} must be a dotted path such as 'mypkg.models.MyNet'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"_target_={target!r}: cannot import {module_name!r} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"_target_={target!r}: module {module_name!r} has no attribute {attr!r}") from None


def check_name(kind: str, name: str, target: str | None, table: dict[str, Callable[..., Any]]) -> None:
    """Raise unless ``target`` is given or ``name`` is a built-in of ``table`` (imports nothing)."""
    if not target and name not in table:
        raise RegistryError(
            f"{kind}.name={name!r} is not a built-in {kind}; allowed: {', '.join(table)} "
            f"(or set {kind}._target_ to a dotted import path)"
        )


def resolve(kind: str, name: str, target: str | None, table: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    """The builder for ``target`` if given, else the built-in ``name`` from ``table``."""
    check_name(kind, name, target, table)
    return import_target(target) if target else table[name]
