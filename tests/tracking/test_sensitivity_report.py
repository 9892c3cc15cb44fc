"""The files of a sensitivity analysis: the CSV and MLflow's table hold the same columns, an
infinite SQNR (a quantizer that changed nothing) survives in the CSV, is null in the JSON table
and drawn at the plot's edge; the writes leave no temporary files."""

from __future__ import annotations

import csv
import json
import math

from orchestrator.quant.ptq.sensitivity import Sensitivity
from orchestrator.tracking.sensitivity_report import PLOT_LIMIT, columns, json_columns, write_csv, write_plot

ROWS = [Sensitivity("2.weight", "weight", 4, 3.5, 21.0, 1024), Sensitivity("relu", "activation", 8, 30.25, 4.0),
        Sensitivity("head.weight", "weight", 16, math.inf, 3.9, 80)]


def test_csv_and_table_view_hold_the_same_columns(tmp_path):
    write_csv(tmp_path / "s.csv", ROWS, "sqnr_db")
    with open(tmp_path / "s.csv", newline="") as f:
        read = list(csv.reader(f))
    table = columns(ROWS, "sqnr_db")
    assert read[0] == list(table) == ["rank", "quantizer", "kind", "bits", "elements", "only_on_sqnr_db",
                                      "all_but_sqnr_db"]
    assert read[1] == ["1", "2.weight", "weight", "4", "1024", "3.5", "21.0"]
    assert read[3][5] == "inf" and len(read) == 4
    view = json_columns(ROWS, "sqnr_db")
    assert view["only_on_sqnr_db"] == [3.5, 30.25, None] and view["rank"] == [1, 2, 3]
    json.dumps(view, allow_nan=False)  # valid JSON: no Infinity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


def test_the_plot_is_a_png_with_infinite_scores_and_many_rows(tmp_path):
    write_plot(tmp_path / "s.png", ROWS, "sqnr_db", {"PTQ, all on": 3.4}, "digits W4A8")
    many = [Sensitivity(f"layer{i}.weight", "weight", 4, float(i), 10.0, 10) for i in range(PLOT_LIMIT + 5)]
    write_plot(tmp_path / "many.png", many, "acc", {"FP32": 99.0, "PTQ, all on": math.nan}, "many")
    for name in ("s.png", "many.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.png", "s.png"]
