"""A sweep is validated point by point (as Hydra composes each trial) before Ray starts."""

from __future__ import annotations

import pytest
from helpers_sweep import hydra_app

from orchestrator.sweep.plan import plan_sweep
from orchestrator.train.config import TrialConfigError


def plan(tmp_path, *overrides: str, preset: tuple[str, ...] = (), config: str = "sweep"):
    with hydra_app(config) as (loader, master):
        return plan_sweep(loader, master, [*preset, f"paths.root={tmp_path}", *overrides])


def test_the_default_preset_is_an_eight_trial_grid(tmp_path):
    p = plan(tmp_path, preset=("qat.lr=0.001,0.0003", "qat.range_learning=false,true", "qat.distill.enabled=false,true"))
    assert p.total == 8 and p.spec.name == "default"
    assert p.space.keys == ["qat.lr", "qat.range_learning", "qat.distill.enabled"]
    assert p.base.quant.param_bw == 4 and p.base.trainer.num_workers == 1
    assert (p.base.model.name, p.base.data.name, p.base.task.name) == ("mnist1d_cnn", "mnist1d", "classification")
    assert p.max_epochs() == 15 and p.base.qat.encoding_lr == 0.03
    assert (p.spec.metric, p.spec.mode, p.spec.tie_on_samples) == ("val_acc", "max", True)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_language_modelling_sweep_selects_on_perplexity_downwards(tmp_path):
    p = plan(tmp_path, "model=gpt2_tiny", "data=markov_text", "task=language_modeling", "qat.lr=1e-3,1e-4")
    assert (p.spec.metric, p.spec.mode, p.spec.tie_on_samples) == ("val_ppl", "min", False)
    assert plan(tmp_path, "task=language_modeling", "sweep.metric=val_loss").spec.metric == "val_loss"


def test_config_groups_and_interpolations_compose_per_point(tmp_path):
    p = plan(tmp_path, "quant=w8a8,w3a3", "qat.lr=tag(log,interval(1e-4,1e-2))", "sweep.num_samples=3")
    assert p.total == 6
    app = p.composer.compose(p.space.overrides({"quant": "w3a3", "qat.lr": 0.002}))
    assert app["quant"]["param_bw"] == 3 and app["qat"]["lr"] == 0.002
    assert app["sweep"]["registered_model"] == "mnist1d_cnn-mnist1d-qat"  # ${model.name}-${data.name}-qat


def test_qat_train_multirun_sweeps_with_the_same_sweeper(tmp_path):
    p = plan(tmp_path, "qat.lr=1e-3,1e-4", config="train")
    assert p.total == 2 and p.spec.name.startswith("mnist1d_cnn-W8A8-")


@pytest.mark.parametrize("override,message", [
    ("sweep.metric=test_acc", "sweep.metric='test_acc' is not allowed; allowed: val_acc, val_top5 (test metrics are "
                              "reported for every trial, never optimised)"),
    ("sweep.metric=train_loss", "sweep.metric='train_loss' is not allowed; allowed: empty (the task's primary "
                                "validation metric) or val_<metric>"),
    ("sweep.metric=val_ppl", "sweep.metric='val_ppl' is not allowed; allowed: val_acc, val_top5"),
    ("qat.lr=inf", "qat.lr=inf is not allowed; allowed: a finite number in (0, 10]"),
    ("task=custom", "task._target_"),
    ("sweep.search=bayes", "sweep.search='bayes' is not allowed; allowed: grid, random, optuna"),
    ("sweep.scheduler=pbt", "sweep.scheduler='pbt' is not allowed; allowed: none, asha, hyperband"),
    ("qat.lr=0.1,-1", "sweep point (qat.lr=-1): qat.lr=-1.0 is not allowed; allowed: a finite number in (0, 10]"),
    ("quant=w8a8,w9a9", "Could not find 'quant/w9a9'"),
    ("qat.epochs=choice(1,abc)", "qat.epochs"),
])
def test_bad_sweeps_fail_with_one_line_before_anything_runs(tmp_path, override, message):
    with pytest.raises(TrialConfigError) as info:
        plan(tmp_path, override)
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert list(tmp_path.iterdir()) == []
