"""Readable trial names from the sweep point."""

from __future__ import annotations

from orchestrator.sweep.naming import short_number, trial_run_name
from orchestrator.sweep.trial import trial_number
from orchestrator.train.config import TrialConfig


def test_short_numbers():
    assert [short_number(v) for v in (1e-3, 3.2e-4, 0.05, 0.5, 3, 1e-5, 12345.0, True)] == [
        "1e-3", "3.2e-4", "0.05", "0.5", "3", "1e-5", "1.23e4", "true"]


def test_run_names_show_bits_lr_epochs_mode_and_other_swept_keys():
    cfg = TrialConfig()
    cfg.quant.param_bw, cfg.quant.output_bw, cfg.qat.lr, cfg.qat.epochs = 4, 4, 1e-3, 3
    cfg.qat.range_learning = True
    assert trial_run_name(cfg, {"qat.lr": 1e-3, "quant": "w4a4"}) == "w4a4 lr=1e-3 ep=3 RL"
    cfg.qat.range_learning = False
    assert trial_run_name(cfg, {"qat.batch_size": 128}, number=2) == "w4a4 lr=1e-3 ep=3 static batch_size=128 #2"


def test_trial_numbers_come_from_generated_ids_only():
    assert trial_number("b0ff0_00003") == 4 and trial_number("6dcd64ce") is None
