"""Hydra's sweep grammar -> search dimensions -> Ray Tune domains; values back into overrides."""

from __future__ import annotations

import pytest
from helpers_sweep import hydra_app
from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer

from orchestrator.sweep.space import parse_space, value_text
from orchestrator.train.config import TrialConfigError


def space_of(*overrides: str):
    with hydra_app() as (loader, _):
        return parse_space(list(overrides), loader)


def test_every_form_of_the_grammar_maps_to_a_dimension():
    space = space_of("qat.epochs=1,3", "quant=choice(w8a8,w4a4)", "qat.lr=tag(log,interval(1e-5,1e-2))",
                     "qat.momentum=interval(0.5,0.9)", "qat.batch_size=range(32,129,32)",
                     "qat.calibration_batches=int(interval(2,8))", "qat.seed=3", "trainer=local")
    dims = {d.key: d for d in space.dims}
    assert space.base == ["qat.seed=3", "trainer=local"]
    assert dims["qat.epochs"].values == (1, 3) and dims["quant"].values == ("w8a8", "w4a4")
    assert dims["qat.batch_size"].values == (32, 64, 96, 128)
    lr = dims["qat.lr"]
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-5, 1e-2, True, False)
    assert dims["qat.calibration_batches"].integer and dims["qat.calibration_batches"].high == 8
    assert lr.describe() == "tag(log,interval(1e-05,0.01))"
    assert dims["qat.calibration_batches"].describe() == "int(interval(2,8))"


def test_search_decides_grid_or_sampled_domains():
    space = space_of("qat.epochs=1,3", "qat.lr=tag(log,interval(1e-5,1e-2))",
                     "qat.calibration_batches=int(interval(2,8))")
    grid = space.param_space("grid")
    assert grid["qat.epochs"] == tune.grid_search([1, 3])
    assert isinstance(grid["qat.lr"], Float) and grid["qat.lr"].lower == 1e-5
    assert isinstance(grid["qat.calibration_batches"], Integer) and grid["qat.calibration_batches"].upper == 9
    sampled = space.param_space("optuna")
    assert isinstance(sampled["qat.epochs"], Categorical) and sampled["qat.epochs"].categories == [1, 3]
    assert space.grid_size("grid") == 2 and space.grid_size("random") == 1


def test_command_line_replaces_a_preset_param_of_the_same_key():
    space = space_of("qat.lr=0.001,0.0001", "qat.epochs=1,3", "qat.lr=0.05")
    assert space.base == ["qat.lr=0.05"] and [d.key for d in space.dims] == ["qat.epochs"]


def test_values_written_back_parse_to_the_same_values():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in (1e-3, 3, True, None, "w4a4", "a b", "true", "1", [1, 2], {"k": "v"}, 0.1 + 0.2, "it's"):
        parsed = parser.parse_override(f"k={value_text(value)}").value()
        assert parsed == value, (value, value_text(value), parsed)


def test_check_points_cover_the_grid_corners_and_interval_bounds():
    space = space_of("qat.epochs=1,3", "quant=w8a8,w4a4", "qat.lr=interval(1e-4,1e-2)")
    points = space.check_points("grid")
    assert {"qat.epochs": 1, "quant": "w4a4"} in points and {"qat.lr": 1e-4} in points and {"qat.lr": 1e-2} in points
    assert len(points) == 4 + 2
    assert space.overrides({"quant": "w4a4", "qat.lr": 0.001}) == ["quant=w4a4", "qat.lr=0.001"]


@pytest.mark.parametrize("override,message", [
    ("qat.lr=interval(0.1,0.01)", "an interval needs low < high"),
    ("qat.lr=tag(log,interval(0,0.01))", "low > 0 (log scale)"),
    ("qat.lr=choice(", "qat.lr=choice("),
])
def test_bad_sweeps_are_one_line_errors(override, message):
    with pytest.raises(TrialConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        space_of(override)
    assert "\n" not in str(info.value)


def test_glob_sweeps_list_a_config_groups_options():
    (dim,) = space_of("quant=glob(w4*)").dims
    assert sorted(dim.values) == ["w4a4", "w4a8", "w4g128", "w4g32a4", "w4g32a8", "w4lpbq"]


def test_lists_of_ptq_steps_sweep_as_values(tmp_path):
    """``qat.init=[],[cle],[cle,adaround]``: one dimension of three lists; each point composes (Hydra,
    the schema) into a valid trial config holding its list."""
    from orchestrator.app_config import trial_config
    from orchestrator.sweep.compose import Composer

    with hydra_app() as (loader, master):
        space = parse_space(["qat.init=[],[cle],[cle,adaround]"], loader)
        (dim,) = space.dims
        assert dim.key == "qat.init" and dim.values == ([], ["cle"], ["cle", "adaround"])
        assert space.overrides({"qat.init": ["cle", "adaround"]}) == ["qat.init=[cle,adaround]"]
        assert space.grid_size("grid") == 3
        composer = Composer(loader, master)
        for value in dim.values:
            app = composer.compose(space.overrides({"qat.init": value}))
            assert trial_config(app, tmp_path).qat.init == value
