"""A trial's PTQ steps (qat.init): applied in order after the sim is built, each measured and
logged to MLflow, then QAT continues from the result; the config rejects bad step lists."""

from __future__ import annotations

import pytest
from helpers_trial import trial_config
from mlflow import MlflowClient

from orchestrator.train.config import TrialConfig, TrialConfigError
from orchestrator.train.launcher import run_trial


@pytest.mark.slow
def test_init_steps_are_logged_and_qat_starts_from_them(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{
        "trainer.num_workers": 0, "qat.epochs": 1, "quant.param_bw": 3, "quant.output_bw": 8,
        "qat.init": ["cle", "seqmse", "adaround"], "qat.ptq.adaround_iterations": 20,
        "qat.calibration_batches": 1})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished"
    for step in ("cle", "seqmse", "adaround"):
        assert 0 <= m[f"ptq_after_{step}_acc"] <= 100 and m[f"ptq_{step}_s"] > 0
    assert m["ptq_acc"] == m["ptq_after_adaround_acc"]  # QAT starts from the last step
    assert 0 <= m["ptq_plain_acc"] <= 100
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    for key in ("ptq_plain_acc", "ptq_after_cle_acc", "ptq_after_seqmse_acc", "ptq_after_adaround_acc",
                "ptq_adaround_s"):
        assert key in run.data.metrics, key
    assert run.data.params["qat.init"] == '["cle", "seqmse", "adaround"]'
    assert run.data.params["qat.ptq.adaround_iterations"] == "20"


def test_a_trial_without_init_steps_logs_no_ptq_step_metrics(tmp_path, baseline_cache):
    result = run_trial(trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 0}))
    assert not [k for k in result.metrics if k.startswith(("ptq_plain", "ptq_after"))]


@pytest.mark.slow
def test_batchnorms_kept_through_qat_are_reestimated_and_folded_before_export(tmp_path, baseline_cache):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 1,
                                                     "quant.fold_batchnorm": False, "qat.bn_reestimate_batches": 2})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["bn_reestimate_s"] > 0
    assert m["test_acc"] >= m["fp32_acc"] - 3
    assert (tmp_path / "trial" / "export" / "model.onnx").is_file()


@pytest.mark.slow
def test_mixed_precision_keeps_the_most_sensitive_quantizers_at_high_bits(tmp_path, baseline_cache):
    import json

    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 0, "quant.param_bw": 4,
                                                     "quant.output_bw": 4, "quant.mixed.keep_top_k": 2,
                                                     "qat.calibration_batches": 2})
    result = run_trial(cfg)
    m = result.metrics
    assert m["status"] == "finished" and m["mixed_high_quantizers"] == 2 and 4 <= m["weight_bits"] <= 8
    doc = json.loads(open(m["export_encodings"]).read())
    widths = [e["bw"] for e in doc["param_encodings"] + doc["activation_encodings"]]
    assert widths.count(8) == 2 and set(widths) == {4, 8}  # each tensor's own bit width


@pytest.mark.parametrize("init, message", [
    (["cle", "bogus"], r"qat.init=\['cle', 'bogus'\] is not allowed; allowed: a list of distinct names from cle, "
                       r"adaround, seqmse, e.g. \[cle,adaround\] \('bogus' is not one\)"),
    (["adaround", "cle"], r"ahead of adaround/seqmse"),
    ("cle", r"qat.init='cle' is not allowed"),
])
def test_bad_init_lists_are_one_line_errors(init, message):
    with pytest.raises(TrialConfigError, match=message):
        TrialConfig.from_dict({"qat": {"init": init}})


def test_bn_reestimation_needs_batchnorms_kept():
    with pytest.raises(TrialConfigError, match=r"qat.bn_reestimate_batches=4 is not allowed; allowed: 0 when "
                                               r"quant.fold_batchnorm=true"):
        TrialConfig.from_dict({"qat": {"bn_reestimate_batches": 4}})
