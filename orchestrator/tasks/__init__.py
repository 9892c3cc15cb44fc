"""What is being learned: a task's loss, metrics and batch layout (``Task``), built-in tasks,
and helpers for batches of any form. Torch only; the train loop is task-agnostic."""

from .base import Metric, Task
from .batches import batch_size, feed, head, logits_of, to_device
from .classification import Classification
from .language_modeling import LanguageModeling
from .registry import TASKS, build_task

__all__ = ["TASKS", "Classification", "LanguageModeling", "Metric", "Task", "batch_size", "build_task", "feed",
           "head", "logits_of", "to_device"]
