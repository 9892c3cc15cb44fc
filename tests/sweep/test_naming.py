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


def test_bits_labels_name_blocks_float_formats_and_weight_only_presets():
    from orchestrator.train.labels import bits_label

    def label(**quant) -> str:
        cfg = TrialConfig()
        for key, value in quant.items():
            setattr(cfg.quant, key, value)
        return bits_label(cfg)

    assert label(param_bw=4, output_bw=8) == "w4a8"
    assert label(param_bw=4, param_block_size=32, output_bw=8, output_granularity="per_token") == "w4g32a8"
    assert label(param_bw=2, param_block_size=32, quantize_activations=False) == "w2g32"
    assert label(param_format="float8_e4m3fn", output_format="float8_e4m3fn") == "wfp8afp8"
    from orchestrator.tracking.plot import _bits_order

    assert sorted(["w2g32", "w4g32a4", "w8a8", "w4g32a8"], key=_bits_order) == ["w8a8", "w4g32a8", "w4g32a4", "w2g32"]


def test_trial_numbers_come_from_generated_ids_only():
    assert trial_number("b0ff0_00003") == 4 and trial_number("6dcd64ce") is None
