"""Hydra schemas of the CLI apps: the trial dataclasses plus output paths and the sweep node.

Registered in Hydra's ConfigStore as ``qat_train_schema`` / ``qat_sweep_schema``; the primary
configs in ``conf/`` list them first in their defaults, so every override is type-checked
and unknown keys are rejected. Values are checked again, semantically, by
``TrialConfig.validate`` / ``SweepSpec.validate`` before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sweep.spec import SweepSpec
from .train.config import TrialConfig, TrialSections


@dataclass
class PathsSpec:
    """``root``: where runs, sweeps and the default MLflow database (``mlflow.db``) live."""

    root: str = "outputs"


@dataclass
class TrainAppConfig(TrialSections):
    """``name``: the run's directory under ``<paths.root>/train``."""

    paths: PathsSpec = field(default_factory=PathsSpec)
    name: str = "qat-train"


@dataclass
class SweepAppConfig(TrainAppConfig):
    sweep: SweepSpec = field(default_factory=SweepSpec)


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="qat_train_schema", node=TrainAppConfig)
    cs.store(name="qat_sweep_schema", node=SweepAppConfig)


def output_root(app: dict[str, Any]) -> Path:
    return Path(app["paths"]["root"]).expanduser().resolve()


def trial_config(app: dict[str, Any], output_dir: str | Path) -> TrialConfig:
    """The ``TrialConfig`` held by a resolved app config (a plain dict), writing to ``output_dir``."""
    sections = {k: app[k] for k in ("model", "data", "quant", "qat", "trainer", "tracking")}
    return TrialConfig.from_dict({**sections, "output_dir": str(output_dir), "export_prefix": app["export_prefix"]})
