"""Strategies (``trainer.strategy``), the loop seam (``qat.loop``), accumulation, autocast,
optimizer and schedule partials: real trials, FSDP2 and DDP on 2 real Ray Train gloo workers."""

from __future__ import annotations

import pytest
import torch
from helpers_trial import trial_config
from mlflow import MlflowClient

from orchestrator.train.config import TrialConfig, TrialConfigError
from orchestrator.train.launcher import run_trial

# Range learning: the quantizers' own parameters (log_scale, offset) are sharded with their blocks;
# distillation: the FP32 teacher is sharded too.
TWO_WORKERS = {"trainer.num_workers": 2, "qat.epochs": 3, "qat.range_learning": True, "qat.distill.enabled": True}


def _losses(result) -> list[float]:
    return [h.value for h in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "train_loss")]


def _export(tmp, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp / name / "export" / "model.pth", weights_only=True)


@pytest.fixture(scope="module")
def ddp_and_fsdp(tmp_path_factory, baseline_cache, ray_local):
    tmp = tmp_path_factory.mktemp("strategies")
    ddp = run_trial(trial_config(tmp, baseline_cache, name="ddp", **TWO_WORKERS, **{"trainer.strategy": "ddp"}))
    fsdp = run_trial(trial_config(tmp, baseline_cache, name="fsdp", **TWO_WORKERS, **{"trainer.strategy": "fsdp"}))
    return tmp, ddp, fsdp


def test_fsdp_trial_follows_the_ddp_trial_with_half_the_memory_per_rank(ddp_and_fsdp):
    """FSDP2 and DDP compute the same averaged gradients (reduce-scatter vs all-reduce, summed in
    another order): the first epoch's loss agrees to 1e-3; later epochs within 5% (a float ulp
    that moves a value across a rounding boundary of a fake-quant grid changes the next steps).
    With two ranks they agree exactly (two gradients average alike in either order); the tolerance
    is for more ranks or NCCL's ring order. Every rank holds identical encodings at the end;
    parameters + Adam state per rank are about half of DDP's (a full replica per rank); the
    gathered model is exported."""
    tmp, ddp, fsdp = ddp_and_fsdp
    assert ddp.metrics["status"] == fsdp.metrics["status"] == "finished"
    a, b = _losses(ddp), _losses(fsdp)
    print(f"train_loss ddp {a} fsdp {b}; param+optimizer bytes per rank ddp {ddp.metrics['param_optimizer_bytes']} "
          f"fsdp {fsdp.metrics['param_optimizer_bytes']}")
    assert len(a) == len(b) == 3
    assert b[0] == pytest.approx(a[0], rel=1e-3)
    assert b == pytest.approx(a, rel=0.05)
    assert b[-1] < b[0]
    assert abs(fsdp.metrics["test_acc"] - ddp.metrics["test_acc"]) <= 1.5
    digests = fsdp.metrics["encoding_digests"].split(",")
    assert len(digests) == 2 and len(set(digests)) == 1
    ratio = fsdp.metrics["param_optimizer_bytes"] / ddp.metrics["param_optimizer_bytes"]
    assert 0.45 <= ratio <= 0.6, ratio
    assert set(_export(tmp, "fsdp")) == set(_export(tmp, "ddp"))  # the full model, as DDP exports it
    run = MlflowClient(fsdp.tracking_uri).get_run(fsdp.run_id)
    assert run.data.tags["qat.strategy"] == "fsdp" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_killed_fsdp_worker_resumes_from_its_sharded_checkpoint_to_the_same_result(ddp_and_fsdp, baseline_cache):
    tmp, _, fsdp = ddp_and_fsdp
    cfg = trial_config(tmp, baseline_cache, name="fsdp-killed", **TWO_WORKERS,
                       **{"trainer.strategy": "fsdp", "trainer.max_failures": 1,
                          "trainer.fault_injection.kill_rank": 1, "trainer.fault_injection.at_epoch": 1})
    killed = run_trial(cfg)
    assert killed.metrics["status"] == "finished" and killed.metrics["resumed_from_epoch"] == 0
    assert _losses(killed) == _losses(fsdp)  # bit-exact: the same losses, the same weights and encodings
    a, b = _export(tmp, "fsdp"), _export(tmp, "fsdp-killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp / "fsdp-killed" / "export" / "model.encodings").read_text() == \
        (tmp / "fsdp" / "export" / "model.encodings").read_text()


def test_user_loop_and_accumulation_equal_one_larger_batch(tmp_path, baseline_cache):
    """A batch of 64, the default loop accumulating 2 batches of 32, and a user's epoch function
    (``user_code.accumulating_epoch``) doing the same: the same weights after an epoch (to float
    rounding: the sums run in another order). Calibration sees the same 512 samples in each."""
    # min_max: a batch of 32 and one of 64 run conv kernels that differ in the last bits; a value on a
    # rounding boundary then moves one step, and sqnr's clipped (finer) grids have more boundaries
    same = {"trainer.num_workers": 0, "qat.epochs": 1, "qat.optimizer": "sgd", "qat.lr": 0.05,
            "quant.quant_scheme": "min_max"}
    runs = {
        "large": {"qat.batch_size": 64, "qat.calibration_batches": 8},
        "accumulated": {"qat.batch_size": 32, "qat.calibration_batches": 16, "qat.accumulation_steps": 2},
        "user": {"qat.batch_size": 32, "qat.calibration_batches": 16,
                 "qat.loop": {"_target_": "user_code.accumulating_epoch", "every": 2}},
    }
    for name, overrides in runs.items():
        assert run_trial(trial_config(tmp_path, baseline_cache, name=name, **same, **overrides)).metrics[
            "status"] == "finished"
    large = _export(tmp_path, "large")
    for name in ("accumulated", "user"):
        other = _export(tmp_path, name)
        for k, v in large.items():
            torch.testing.assert_close(other[k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_bf16_autocast_trial_trains(tmp_path, baseline_cache):
    """``qat.autocast=bf16``: the forward in bfloat16 on the CPU; the loss falls and the model keeps
    its accuracy (bf16's 8-bit mantissa is as coarse as the 8-bit grids)."""
    result = run_trial(trial_config(tmp_path, baseline_cache, **{"trainer.num_workers": 0, "qat.epochs": 2,
                                                                 "qat.autocast": "bf16"}))
    m = result.metrics
    assert m["status"] == "finished"
    losses = _losses(result)
    assert losses[-1] < losses[0]
    assert m["test_acc"] >= m["fp32_acc"] - 3.0, m


def test_optimizer_and_schedule_partials(tmp_path, baseline_cache):
    """``qat.optimizer`` as a ``_target_`` partial (AdamW with its own betas) and a per-step schedule
    (``onecycle``): the encodings keep their own group; lr is logged per epoch."""
    result = run_trial(trial_config(tmp_path, baseline_cache, **{
        "trainer.num_workers": 0, "qat.epochs": 2, "qat.range_learning": True, "qat.schedule": "onecycle",
        "qat.optimizer": {"_target_": "torch.optim.AdamW", "betas": [0.9, 0.95]}}))
    assert result.metrics["status"] == "finished"
    lrs = [h.value for h in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "lr")]
    assert lrs[0] < 1e-3 and lrs[1] > lrs[0]  # OneCycle warms up from max_lr / 25


@pytest.mark.parametrize("key,value,message", [
    ("trainer.strategy", "zero", r"trainer.strategy='zero' is not allowed; allowed: null .*single, ddp, fsdp"),
    ("trainer.strategy", "fsdp", r"trainer.strategy='fsdp' is not allowed; allowed: single with "
                                 r"trainer.num_workers=0"),
    ("qat.optimizer", {"lr": 1}, r"qat.optimizer=\{'lr': 1\} is not allowed; allowed: sgd, adam, adamw, or a "
                                 r"mapping with _target_"),
    ("qat.schedule", "linear", r"qat.schedule='linear' is not allowed; allowed: cosine, step, constant"),
    ("qat.accumulation_steps", 0, r"qat.accumulation_steps=0 is not allowed; allowed: an integer >= 1"),
    ("qat.autocast", "fp8", r"qat.autocast='fp8' is not allowed; allowed: null, bf16"),
    ("qat.loop", {"every": 2}, r"qat.loop=\{'every': 2\} is not allowed; allowed: the dotted path of an epoch "
                               r"function, or a mapping with _target_"),
])
def test_bad_strategy_and_loop_values_are_one_clear_error(key, value, message):
    section, _, field = key.partition(".")
    d = TrialConfig().to_dict()
    d["trainer"]["num_workers"] = 0
    d[section][field] = value
    with pytest.raises(TrialConfigError, match=message):
        TrialConfig.from_dict(d)
