"""``single``: one worker, ``sim.model`` trained as it is; the base class's behaviour."""

from __future__ import annotations

from .base import Strategy


class Single(Strategy):
    name = "single"
