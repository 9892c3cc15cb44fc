"""Every default is written once (issue 19): in the schema (``orchestrator/train/config.py``, or the
core dataclass it wraps); a config group file holds only what differs from it, and the built-in
data groups' ``args`` only what differs from their builder's own defaults."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from orchestrator.train.config import SECTIONS
from orchestrator.tasks.registry import TASKS
from orchestrator.zoo.registry import DATASETS, MODELS

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_FILES = sorted(p for section in SECTIONS for p in (CONF / section).glob("*.yaml"))
# what a preset's name means is said in it even where it equals the schema (w8a8: 8 and 8 bits)
DEFINING = {"model": {"name"}, "data": {"name"}, "task": {"name"}, "quant": {"param_bw", "output_bw"},
            "qat": {"range_learning"}}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_group_file_restates_no_default(path):
    values = yaml.safe_load(path.read_text()) or {}
    defaults = _defaults(SECTIONS[path.parent.name])
    keep = DEFINING.get(path.parent.name, set())
    restated = sorted(k for k, v in values.items() if k not in keep and k in defaults and defaults[k] == v)
    assert not restated, f"{path.parent.name}/{path.name} restates the schema's defaults of {restated}"


BUILDERS = {"data": DATASETS, "model": MODELS, "task": TASKS}


@pytest.mark.parametrize("path", sorted(p for group in BUILDERS for p in (CONF / group).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_builder_arguments_are_not_restated(path):
    values = yaml.safe_load(path.read_text()) or {}
    table = BUILDERS[path.parent.name]
    if values.get("name") not in table:
        return  # custom: the user's builder
    params = inspect.signature(table[values["name"]]).parameters
    args = values.get("args") or {}
    restated = sorted(k for k, v in args.items() if k in params and _plain(params[k].default) == _plain(v))
    assert not restated, f"{path.parent.name}/{path.name} restates {values['name']}'s own defaults of {restated}"


def test_the_readme_table_of_defaults_is_the_schemas():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    table = subprocess.run([sys.executable, str(root / "scripts" / "defaults_table.py")], capture_output=True,
                           text=True, check=True).stdout.strip()
    readme = (root / "README.md").read_text()
    assert table in readme, "README's table of defaults is stale: run scripts/defaults_table.py --write"
