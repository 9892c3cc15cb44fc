"""The files of a sensitivity analysis (``qat-analyze``): its table and its bar plot.

The table has one row per quantizer, most sensitive first (``quant/ptq/sensitivity.py`` ranks
them), with the columns ``rank`` (1: most sensitive), ``quantizer`` (a weight's parameter name,
an activation's name in ``sim.summary()``), ``kind`` (weight, activation), ``bits``, ``elements``
(a weight's element count; 0 for an activation), ``only_on_<metric>`` (the score with only this
quantizer on) and ``all_but_<metric>`` (every quantizer on but this one). ``<metric>`` is
``sqnr_db`` (output SQNR against FP32, dB) or the task's metric (``acc``, ``ppl``, ...).
``columns`` is the one definition of that table: the CSV and MLflow's table view are written from it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ..fileio import atomic_write

PLOT_LIMIT = 60  # quantizers drawn at most (the most sensitive); the CSV holds them all


def columns(rows: list, metric: str) -> dict[str, list[Any]]:
    """The table of ``rows`` (``Sensitivity``, most sensitive first) as ``{column: values}``."""
    return {"rank": list(range(1, len(rows) + 1)), "quantizer": [r.name for r in rows],
            "kind": [r.kind for r in rows], "bits": [r.bitwidth for r in rows], "elements": [r.numel for r in rows],
            f"only_on_{metric}": [r.only_on for r in rows], f"all_but_{metric}": [r.all_but for r in rows]}


def json_columns(rows: list, metric: str) -> dict[str, list[Any]]:
    """``columns`` with non-finite scores (an SQNR of ``inf``: the quantizer changed nothing) as
    None, so the table is valid JSON."""
    return {k: [v if not isinstance(v, float) or math.isfinite(v) else None for v in values]
            for k, values in columns(rows, metric).items()}


def write_csv(path: str | Path, rows: list, metric: str) -> None:
    """The table as CSV at ``path`` (atomic: a reader sees the old file or the whole new one)."""
    table = columns(rows, metric)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(table)
            w.writerows(zip(*table.values()))

    atomic_write(path, write)


def write_plot(path: str | Path, rows: list, metric: str, references: dict[str, float], title: str) -> None:
    """Horizontal bars per quantizer (the most sensitive on top, at most ``PLOT_LIMIT``): its score
    with only it on and with all but it on; ``references`` (``{"PTQ (all on)": 88.1, ...}``) as
    vertical lines. Infinite scores (nothing changed) are drawn at the axis' right end. PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:PLOT_LIMIT]
    values = [v for r in shown for v in (r.only_on, r.all_but)] + list(references.values())
    finite = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or abs(hi) or 1.0
    ceiling = hi + 0.08 * span  # where an infinite score (nothing changed) is drawn, marked "inf"

    def drawn(v: float) -> float:
        return v if math.isfinite(v) else ceiling

    fig, ax = plt.subplots(figsize=(8.0, 1.7 + 0.32 * len(shown)))
    ys = list(range(len(shown)))
    height = 0.38
    for offset, attr, label, color in ((-height / 2, "only_on", "only this quantizer on", "#d62728"),
                                       (height / 2, "all_but", "all but this one on", "#1f77b4")):
        scores = [getattr(r, attr) for r in shown]
        ax.barh([y + offset for y in ys], [drawn(v) for v in scores], height, label=label, color=color)
        for y, v in zip(ys, scores):
            if not math.isfinite(v):
                ax.text(ceiling, y + offset, " inf", va="center", fontsize=6)
    for (label, value), style in zip(references.items(), ("--", ":", "-.")):
        if math.isfinite(value):
            ax.axvline(value, color="0.3", linestyle=style, linewidth=1, label=f"{label}: {value:.2f}")
    ax.set_yticks(ys, [f"{r.name} ({r.kind[0]}{r.bitwidth})" for r in shown], fontsize=7)
    ax.invert_yaxis()  # the most sensitive on top
    left = max(0.0, lo - 0.25 * span) if lo >= 0 else lo - 0.05 * span
    ax.set_xlim(left, (ceiling if any(not math.isfinite(v) for v in values) else hi) + 0.05 * span)
    ax.set_xlabel("output SQNR vs FP32 (dB)" if metric == "sqnr_db" else metric)
    more = f"; the {len(shown)} most sensitive of {len(rows)}" if len(rows) > len(shown) else ""
    ax.set_title(f"{title}\nmost sensitive first{more}", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.28 / fig.get_figheight(), 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
