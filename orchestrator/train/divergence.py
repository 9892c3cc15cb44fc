"""When a trial has diverged: its loss exploded, or its model ended no better than a random guess.

Fake quantization keeps absurd weights finite (every activation is clamped to its encoding), so a
diverging QAT run rarely produces NaN: its loss explodes instead, or its accuracy collapses to
chance while the loss stays finite. Both checks use values every rank shares (all-reduced).
"""

from __future__ import annotations

import math

from ..tasks import Task

# An epoch whose mean training loss exceeds this many times the loss of a uniform guess has diverged.
EXPLODED_LOSS_FACTOR = 3.0
# The primary metric has "stayed at chance" when it is within this fraction of the way from chance
# to the FP32 model's value (while the FP32 model itself was well above chance).
CHANCE_MARGIN = 0.05


def exploded_loss(mean_loss: float, uniform_loss: float | None) -> bool:
    return uniform_loss is not None and (not math.isfinite(mean_loss) or mean_loss > EXPLODED_LOSS_FACTOR * uniform_loss)


def stayed_at_chance(task: Task, num_outputs: int | None, fp32: dict[str, float], value: dict[str, float]) -> bool:
    """True when ``value``'s primary metric is no better than chance (within ``CHANCE_MARGIN`` of
    the chance-to-FP32 distance) although the FP32 model's is far from it. False when the task
    has no chance level or the FP32 model is itself near chance."""
    if not num_outputs or num_outputs < 2:
        return False
    chance = task.chance(num_outputs).get(task.primary)
    ref, got = fp32.get(task.primary), value.get(task.primary)
    if chance is None or ref is None or got is None or not math.isfinite(ref):
        return False
    higher = task.metric(task.primary).mode == "max"
    span = (ref - chance) if higher else (chance - ref)
    if span <= 0.5 * abs(chance):  # the FP32 model is near chance itself
        return False
    if not math.isfinite(got):
        return True
    gained = (got - chance) if higher else (chance - got)
    return gained <= CHANCE_MARGIN * span
