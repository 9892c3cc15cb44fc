"""The README's command forms for the new formats and PTQ steps, through the real qat-train."""

from __future__ import annotations

import json

import pytest
from helpers_cli import run_cli


@pytest.mark.slow
def test_a_language_model_trains_and_exports_as_8da4w(tmp_path, baseline_cache):
    root = tmp_path / "out"
    proc = run_cli("qat-train", [f"paths.root={root}", "name=lm", "model=gpt2_tiny", "data=markov_text",
                                 "task=language_modeling", "quant=w4g32a8", "model.pretrain_epochs=2",
                                 "qat.epochs=1", "trainer=local"], tmp_path, baseline_cache, timeout=1500)
    assert "PTQ W4G32A8" in proc.stdout and "ppl" in proc.stdout, proc.stdout
    doc = json.loads((root / "train" / "lm" / "export" / "model.encodings").read_text())
    blocked = [e for e in doc["param_encodings"] if e.get("enc_type") == "PER_BLOCK"]
    assert blocked and all(e["block_size"] == 32 and e["bw"] == 4 for e in blocked)
    assert doc["dynamic_activation_encodings"]  # int8 per-token activations, computed at run time


def test_ptq_steps_run_before_qat_from_the_command_line(tmp_path, baseline_cache):
    root = tmp_path / "out"
    proc = run_cli("qat-train", [f"paths.root={root}", "name=init", "model=digits_cnn", "data=digits",
                                 "model.pretrain_epochs=15", "quant=w3a3", "qat.init=[cle,seqmse,adaround]",
                                 "qat.ptq.adaround_iterations=20", "qat.epochs=1", "trainer=local"],
                   tmp_path, baseline_cache)
    for step in ("cle", "seqmse", "adaround"):
        assert f"PTQ step {step}: acc " in proc.stdout, proc.stdout
    assert "QAT 1 epoch(s)" in proc.stdout


def test_the_readme_analyze_form_prints_the_ranked_table_and_writes_it(tmp_path, baseline_cache):
    root = tmp_path / "out"
    proc = run_cli("qat-analyze", [f"paths.root={root}", "model=digits_cnn", "data=digits", "quant=w4a4"],
                   tmp_path, baseline_cache)
    assert "most sensitive first" in proc.stdout and "most sensitive: " in proc.stdout, proc.stdout
    (csv,) = (root / "analyze").glob("*/sensitivity.csv")
    assert (csv.parent / "sensitivity.png").is_file()
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 5 + 8  # header, the digits CNN's 5 weight and 8 activation quantizers
