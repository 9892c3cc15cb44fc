"""Hydra's sweep grammar -> a search space -> Ray Tune's ``param_space``.

Hydra parses the overrides (``OverridesParser``); this module only maps what it parsed:

=====================================  =========================  ==========================
override                               ``search=grid``            ``random`` / ``optuna``
=====================================  =========================  ==========================
``k=a,b`` / ``choice(a,b)``            ``tune.grid_search``       ``tune.choice``
``k=range(1,4)`` / ``glob(w4*)``       ``tune.grid_search``       ``tune.choice``
``k=interval(lo,hi)``                  ``tune.uniform``           ``tune.uniform``
``k=tag(log,interval(lo,hi))``         ``tune.loguniform``        ``tune.loguniform``
``k=int(interval(lo,hi))``             ``tune.randint`` (lo..hi)  ``tune.randint`` (lo..hi)
=====================================  =========================  ==========================

A key may be a config value (``qat.lr``) or a config group (``quant=w8a8,w4a4``): a trial's
config is composed by Hydra from the base overrides plus its point (``compose.py``), so
groups and interpolations behave exactly as in ``qat-train``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from ..train.config import TrialConfigError


@dataclass(frozen=True)
class Dimension:
    """One swept key. ``values`` for discrete sweeps; ``low``/``high`` (inclusive) for intervals."""

    key: str
    values: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False

    @property
    def is_interval(self) -> bool:
        return self.low is not None

    @property
    def integer(self) -> bool:
        return self.is_interval and isinstance(self.low, int) and isinstance(self.high, int)

    def describe(self) -> str:
        """The dimension in Hydra's grammar (logged to the sweep's MLflow run)."""
        if not self.is_interval:
            return ",".join(value_text(v) for v in self.values)
        text = f"interval({self.low},{self.high})"
        text = f"int({text})" if self.integer else text
        return f"tag(log,{text})" if self.log else text

    def tune_domain(self, search: str) -> Any:
        from ray import tune

        if not self.is_interval:
            return tune.grid_search(list(self.values)) if search == "grid" else tune.choice(list(self.values))
        if self.integer:
            return (tune.lograndint if self.log else tune.randint)(self.low, self.high + 1)
        return (tune.loguniform if self.log else tune.uniform)(float(self.low), float(self.high))

    def edge_values(self) -> tuple[Any, ...]:
        """The values that are checked before a sweep starts: every discrete value, both bounds."""
        return self.values if not self.is_interval else (self.low, self.high)


@dataclass
class SearchSpace:
    """``base``: the plain overrides every trial gets; ``dims``: the swept keys, in order."""

    base: list[str]
    dims: list[Dimension]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    def grid_size(self, search: str) -> int:
        """Trials per ``num_samples``: the product of the discrete sweeps under ``grid``, else 1."""
        size = 1
        if search == "grid":
            for d in self.dims:
                if not d.is_interval:
                    size *= len(d.values)
        return size

    def param_space(self, search: str) -> dict[str, Any]:
        return {d.key: d.tune_domain(search) for d in self.dims}

    def check_points(self, search: str, limit: int = 64) -> list[dict[str, Any]]:
        """Points whose configs are validated before Ray starts: the grid's corners when it is
        small (``<= limit`` combinations), else every value of each dimension on its own."""
        discrete = [d for d in self.dims if not d.is_interval] if search == "grid" else []
        if discrete and self.grid_size(search) <= limit:
            points = [dict(zip([d.key for d in discrete], combo))
                      for combo in itertools.product(*(d.values for d in discrete))]
            others = [d for d in self.dims if d not in discrete]
        else:
            points, others = [{}], list(self.dims)
        for d in others:
            points += [{d.key: v} for v in d.edge_values()]
        return [p for p in points if p] or [{}]

    def overrides(self, point: dict[str, Any]) -> list[str]:
        """``base`` plus ``key=value`` for each key of ``point`` (values in Hydra's grammar)."""
        return [*self.base, *(f"{key}={value_text(value)}" for key, value in point.items())]


def parse_space(overrides: list[str], config_loader) -> SearchSpace:
    """Split Hydra overrides into plain ones and swept dimensions. Later overrides of the same
    key replace earlier ones (command line over a preset's ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=config_loader)
    by_key: dict[str, Any] = {}
    for line in overrides:
        try:
            override = parser.parse_override(line)
        except Exception as exc:  # Hydra's OverrideParseException: a grammar error
            raise TrialConfigError(f"{line}: {one_line(exc)}") from None
        override.config_loader = config_loader  # what glob(...) sweeps list a group's options with
        by_key.pop(override.get_key_element(), None)  # keep the order of the last occurrence
        by_key[override.get_key_element()] = override
    base, dims = [], []
    for key, override in by_key.items():
        if not override.is_sweep_override():
            base.append(override.input_line or f"{key}={override.get_value_element_as_str()}")
        elif override.is_hydra_override():
            raise TrialConfigError(f"{override.input_line}: Hydra's own settings cannot be swept")
        else:
            dims.append(_dimension(key, override))
    return SearchSpace(base, dims)


def _dimension(key: str, override) -> Dimension:
    sweep = override.value()
    if override.is_interval_sweep():
        low, high = sweep.start, sweep.end
        if not low < high or ("log" in sweep.tags and low <= 0):
            raise TrialConfigError(f"{override.input_line}: an interval needs low < high"
                                   f"{' and low > 0 (log scale)' if 'log' in sweep.tags else ''}")
        return Dimension(key, low=low, high=high, log="log" in sweep.tags)
    values = tuple(_plain(v) for v in override.sweep_iterator())
    if not values:
        raise TrialConfigError(f"{override.input_line}: the sweep has no values")
    return Dimension(key, values=values)


def _plain(value: Any) -> Any:
    """A parsed element with Hydra's quoted strings as plain ``str``."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_RESERVED = {"true", "false", "null", "nan", "inf"}


def value_text(value: Any) -> str:
    """``value`` as the right-hand side of a Hydra override (parses back to ``value``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{value_text(k)}:{value_text(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_NOISE = ("Set the environment variable HYDRA_FULL_ERROR", "full_key:", "object_type=", "reference_type=")


def one_line(exc: BaseException) -> str:
    """An exception's message and its causes on one line (Hydra's and OmegaConf's span several):
    a group's available options as a list, Hydra's search path left out."""
    lines: list[str] = []
    while exc is not None and len(lines) < 20:
        for line in str(exc).splitlines():
            line = line.strip()
            if line.startswith("Config search path:"):
                break
            if line and line != "None" and not line.startswith(_NOISE) and line not in lines:
                lines.append(line)
        exc = exc.__cause__
    text = ""
    for line in lines:
        if text.endswith(":"):
            text += " " + line
        elif text.endswith(tuple("abcdefghijklmnopqrstuvwxyz0123456789_")) and line.isidentifier():
            text += ", " + line  # one option of a list
        else:
            text += ("; " if text else "") + line
    return text or type(exc).__name__
