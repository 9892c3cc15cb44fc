"""The comparison plot: axes and facets chosen from what the sweeps varied.

Each swept key becomes a dimension: the ``quant`` group or bit widths -> ``bits`` (a category,
widest first), the ``qat`` group or ``qat.range_learning`` -> ``mode``, other keys by name
(``lr``, ``epochs``, ...). Then:

- **hue**: ``mode`` when swept (static vs range learning are compared within every panel);
- **x**: ``lr`` when swept, else the numeric dimension with most values, else ``bits``, else
  the first other one; numeric x is log-scaled for ``lr`` (or a >= 20x spread);
- **facets**: one panel per combination of the remaining dimensions, one row per sweep when
  several are compared;
- y is the test value of the sweep's metric (``test_acc``, ``test_ppl``); each panel also shows
  the PTQ value at each x (grey, PTQ per group) and the FP32 value (dashed), so QAT's gain over
  PTQ and its gap to FP32 read directly.
"""

from __future__ import annotations

import re

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .compare import TrialRow

ALIASES = {"quant": "bits", "quant.param_bw": "bits", "quant.output_bw": "bits", "qat": "mode",
           "qat.range_learning": "mode", "qat.lr": "lr", "qat.epochs": "epochs"}


@dataclass
class Layout:
    x: str
    hue: str | None
    facets: list[str]
    log_x: bool
    numeric_x: bool


def dimensions(swept: list[str]) -> list[str]:
    out: list[str] = []
    for key in swept:
        dim = ALIASES.get(key.lstrip("+~"), key.lstrip("+~"))
        if dim not in out:
            out.append(dim)
    return out


def value(row: TrialRow, dim: str):
    if dim == "bits":
        return row.bits
    if dim == "mode":
        return row.mode
    if dim == "lr":
        return row.lr
    if dim == "epochs":
        return row.epochs
    if dim == "sweep":
        return row.sweep
    raw = next((v for k, v in row.point.items() if k.lstrip("+~") == dim), "")
    try:
        return float(raw)
    except ValueError:
        return raw


def _numeric(rows: list[TrialRow], dim: str) -> bool:
    return dim not in ("bits", "mode") and all(isinstance(value(r, dim), (int, float)) for r in rows)


def layout(rows: list[TrialRow], swept: list[str], several_sweeps: bool = False) -> Layout:
    dims = dimensions(swept)
    hue = "mode" if "mode" in dims else None
    rest = [d for d in dims if d != hue]
    numeric = [d for d in rest if _numeric(rows, d)]
    if "lr" in numeric:
        x = "lr"
    elif numeric:
        x = max(numeric, key=lambda d: len({value(r, d) for r in rows}))
    elif "bits" in rest:
        x = "bits"
    elif rest:
        x = rest[0]
    else:
        x = "bits"
    facets = [d for d in rest if d != x]
    if several_sweeps:
        facets = ["sweep", *facets]
    is_numeric = _numeric(rows, x)
    xs = [value(r, x) for r in rows] if is_numeric else []
    log_x = is_numeric and bool(xs) and min(xs) > 0 and (x == "lr" or max(xs) / min(xs) >= 20)
    return Layout(x, hue, facets, log_x, is_numeric)


def _bits_order(label: str) -> tuple:
    """Wider first: ``w8a8``, ``w4a8``, ``w4a4``, ``w4g32a8``, ``w2g32`` (the bit widths after ``w``/``a``)."""
    digits = [int(d) for d in re.findall(r"[wa](\d+)", label)]
    return tuple(-d for d in digits) or (0,)


def _categories(rows: list[TrialRow], dim: str) -> list:
    values = {value(r, dim) for r in rows}
    return sorted(values, key=_bits_order) if dim == "bits" else sorted(values, key=str)


def write_plot(rows: list[TrialRow], swept: list[str], path: str | Path, title: str) -> Layout:
    """Plot finished trials (their ``test_<metric>``) of one or more sweeps; returns the layout used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write

    done = [r for r in rows if r.finished]
    several = len({r.sweep for r in rows}) > 1
    lay = layout(done or rows, swept, several)
    panels: dict[tuple, list[TrialRow]] = defaultdict(list)
    for r in done:
        panels[tuple(value(r, d) for d in lay.facets)].append(r)
    keys = sorted(panels, key=lambda k: tuple(str(v) for v in k)) or [()]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 4.6 * ncols), 3.6 * nrows + 0.6), squeeze=False,
                             sharey=True)
    categories = [] if lay.numeric_x else _categories(done or rows, lay.x)
    hues = sorted({value(r, lay.hue) for r in done}) if lay.hue else [None]
    markers = "osD^v"
    for ax, key in zip(axes.flat, keys):
        members = panels.get(key, [])
        _draw_panel(ax, members, lay, categories, hues, markers)
        if lay.facets:
            ax.set_title(", ".join(f"{d}={_short(v)}" for d, v in zip(lay.facets, key)), fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    metric = rows[0].metric if rows else "acc"
    for ax in axes[:, 0]:
        ax.set_ylabel(f"test_{metric}" + (" (%)" if rows and rows[0].tie_on_samples else ""))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 0.97))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return lay


def _draw_panel(ax, members: list[TrialRow], lay: Layout, categories: list, hues: list, markers: str) -> None:
    def position(r: TrialRow, offset: float) -> float:
        if lay.numeric_x:
            v = float(value(r, lay.x))
            return v * (1 + offset) if lay.log_x else v + offset * (abs(v) or 1)
        return categories.index(value(r, lay.x)) + offset

    spread = 0.1 if not lay.numeric_x else 0.08
    for i, hue in enumerate(hues):
        group = sorted((r for r in members if hue is None or value(r, lay.hue) == hue),
                       key=lambda r: (value(r, lay.x) if lay.numeric_x else categories.index(value(r, lay.x))))
        if not group:
            continue
        offset = (i - (len(hues) - 1) / 2) * spread
        xs, ys = [position(r, offset) for r in group], [r.test for r in group]
        one_per_x = len({value(r, lay.x) for r in group}) == len(group)
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if one_per_x else "none",
                label=f"QAT {hue}" if hue else "QAT", zorder=3)
    by_x: dict = defaultdict(list)
    for r in members:
        if not math.isnan(r.ptq):
            by_x[value(r, lay.x)].append(r.ptq)
    if by_x:
        order = sorted(by_x, key=(lambda v: v) if lay.numeric_x else categories.index)
        xs = [(float(v) if lay.numeric_x else categories.index(v)) for v in order]
        ax.plot(xs, [sum(by_x[v]) / len(by_x[v]) for v in order], color="dimgray", marker="x", markersize=8,
                markeredgewidth=1.5, linestyle=":", label="PTQ (calibration only)", zorder=4)
    fp32 = [r.fp32 for r in members if not math.isnan(r.fp32)]
    if fp32:  # under the other series, its value written at the right edge
        level = sum(fp32) / len(fp32)
        ax.axhline(level, color="black", linestyle="--", linewidth=0.8, label="FP32", zorder=1)
        ax.text(1.0, level, f"FP32 {level:.2f} ", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=7)
    if lay.numeric_x:
        if lay.log_x:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), [_short(c) for c in categories])
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xlabel(lay.x)
    ax.grid(True, alpha=0.3)


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
