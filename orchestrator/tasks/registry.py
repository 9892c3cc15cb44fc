"""Tasks by built-in name or by ``_target_`` (a dotted path to a ``Task`` class or factory)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..zoo.registry import RegistryError, resolve
from .base import Task
from .classification import Classification
from .language_modeling import LanguageModeling

TASKS: dict[str, Callable[..., Task]] = {
    "classification": Classification,
    "language_modeling": LanguageModeling,
}


def build_task(name: str, target: str | None = None, args: dict[str, Any] | None = None) -> Task:
    """The task ``target(**args)`` if given, else the built-in ``name``; errors name the key."""
    factory = resolve("task", name, target, TASKS)
    try:
        task = factory(**(args or {}))
    except TypeError as exc:
        raise RegistryError(f"task.args={args!r} do not fit {target or name!r}: {exc}") from None
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    missing = [m for m in ("inputs", "targets", "loss", "metric_sums", "compute_metrics", "metrics", "primary")
               if not hasattr(task, m)]
    if missing:
        raise RegistryError(f"task {target or name!r} is not a Task: it lacks {', '.join(missing)} "
                            "(subclass orchestrator.tasks.Task)")
    if task.primary not in {m.name for m in task.metrics}:
        raise RegistryError(f"task {target or name!r}: primary metric {task.primary!r} is not one of its metrics")
    return task
