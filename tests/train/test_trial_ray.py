"""One trial on real Ray Train DDP workers (gloo, CPU): encodings, fault tolerance, accuracy."""

from __future__ import annotations

import pytest
import torch
from helpers_trial import trial_config
from mlflow import MlflowClient

from orchestrator.train.launcher import run_trial


# min_max activations: the compiled/eager comparison below holds the first epoch to 1e-3. Compiled
# kernels differ from eager ones in the last bits, and a value on a rounding boundary then moves
# one 4-bit step; sqnr's clipped (finer) grids have more boundaries per unit and moved the first
# epoch's loss by 1% (measured, 2026-12-05).
W4A4_MIN_MAX = {"quant.param_bw": 4, "quant.output_bw": 4, "quant.quant_scheme": "min_max"}


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, baseline_cache, ray_local):
    tmp = tmp_path_factory.mktemp("ray-trial")
    cfg = trial_config(tmp, baseline_cache, name="uninterrupted", **W4A4_MIN_MAX,
                       **{"trainer.num_workers": 2, "qat.epochs": 3})
    return tmp, run_trial(cfg)


def test_two_workers_end_calibration_with_bit_identical_encodings(two_worker_run):
    _, result = two_worker_run
    local = result.metrics["local_calibration_digests"].split(",")
    final = result.metrics["calibration_digests"].split(",")
    assert len(local) == 2 and len(set(local)) == 1  # calibration itself agrees on both ranks
    assert len(final) == 2 and len(set(final)) == 1  # and after the broadcast from rank 0
    assert result.metrics["status"] == "finished" and result.metrics["resumed_from_epoch"] == -1
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics


def test_killed_worker_resumes_from_checkpoint_without_doubling_epochs(two_worker_run, baseline_cache):
    tmp, uninterrupted = two_worker_run
    cfg = trial_config(tmp, baseline_cache, name="killed", **W4A4_MIN_MAX,
                       **{"trainer.num_workers": 2, "qat.epochs": 3,
                          "trainer.max_failures": 1, "trainer.fault_injection.kill_rank": 1,
                          "trainer.fault_injection.at_epoch": 1})
    result = run_trial(cfg)
    assert result.metrics["status"] == "finished"
    assert result.metrics["resumed_from_epoch"] == 0  # rank 1 died in epoch 1; epoch 0's checkpoint was used
    client = MlflowClient(result.tracking_uri)
    for key in ("val_acc", "train_loss", "lr"):
        assert [h.step for h in client.get_metric_history(result.run_id, key)] == [0, 1, 2], key
    assert client.get_run(result.run_id).info.status == "FINISHED"
    # the same result as the uninterrupted run
    assert result.metrics["test_acc"] == uninterrupted.metrics["test_acc"]
    a = torch.load(tmp / "uninterrupted" / "export" / "model.pth", weights_only=True)
    b = torch.load(tmp / "killed" / "export" / "model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_compiled_ddp_trial_trains_like_the_eager_one(two_worker_run, baseline_cache):
    """``trainer.compile=true`` on 2 workers compiles the DDP-wrapped sim.model (DDP's graph splits
    at its buckets, the fused op inside): the eager DDP trial's first epoch, then its losses within
    20%, compile time reported apart."""
    tmp, eager = two_worker_run
    cfg = trial_config(tmp, baseline_cache, name="compiled", **W4A4_MIN_MAX,
                       **{"trainer.num_workers": 2, "qat.epochs": 3, "trainer.compile": True})
    compiled = run_trial(cfg)
    assert compiled.metrics["status"] == "finished"
    client = MlflowClient(compiled.tracking_uri)
    losses = [[h.value for h in client.get_metric_history(r.run_id, "train_loss")] for r in (eager, compiled)]
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-3), losses  # the same first epoch
    assert losses[1] == pytest.approx(losses[0], rel=0.2), losses  # then within a few 4-bit flips
    assert losses[1][-1] < 0.3 * losses[1][0], losses  # it trains (eager: 12x lower)
    assert abs(compiled.metrics["test_acc"] - eager.metrics["test_acc"]) <= 1.0
    assert client.get_metric_history(compiled.run_id, "compile_warmup_s")[0].value > 0


@pytest.mark.slow
@pytest.mark.parametrize("bits,range_learning,max_drop", [(8, False, 0.3), (4, False, 1.0), (4, True, 1.0)])
def test_digits_qat_accuracy_with_two_gloo_workers(tmp_path, baseline_cache, ray_local, bits, range_learning,
                                                   max_drop):
    cfg = trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 2, "qat.epochs": 4,
                                                     "quant.param_bw": bits, "quant.output_bw": bits,
                                                     "qat.range_learning": range_learning})
    m = run_trial(cfg).metrics
    print(f"W{bits}A{bits} range_learning={range_learning}: FP32 {m['fp32_acc']:.2f}  PTQ {m['ptq_acc']:.2f}  "
          f"QAT {m['test_acc']:.2f}")
    assert m["test_acc"] >= m["fp32_acc"] - max_drop
