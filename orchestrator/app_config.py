"""The Hydra schema of the CLI apps: the trial sections plus output paths and the sweep node.

Registered in Hydra's ConfigStore as ``qat_app_schema``; the primary configs in
``orchestrator/conf/`` (package data) list it first in their defaults, so every override is
type-checked and unknown keys are rejected. Values are checked again, semantically, by
``TrialConfig.validate`` / ``SweepSpec.validate`` before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sweep.spec import SweepSpec
from .train.config import SECTIONS, TrialConfig, TrialSections

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class PathsSpec:
    """``root``: where runs, sweeps and the default MLflow database (``mlflow.db``) live."""

    root: str = "outputs"


@dataclass
class AppConfig(TrialSections):
    """``name``: the run's directory under ``<paths.root>/train`` (``qat-train``).
    ``sweep``: how ``qat-sweep`` and ``qat-train -m`` search (``SweepSpec``)."""

    paths: PathsSpec = field(default_factory=PathsSpec)
    name: str = "qat-train"
    sweep: SweepSpec = field(default_factory=SweepSpec)


_registered = False


def register_schemas() -> None:
    """Store the schema and the Tune sweeper's node in Hydra's ConfigStore (once per process)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    from hydra_plugins.qat_tune_sweeper.config import register_sweeper_config

    ConfigStore.instance().store(name="qat_app_schema", node=AppConfig)
    register_sweeper_config()
    _registered = True


def output_root(app: dict[str, Any]) -> Path:
    return Path(app["paths"]["root"]).expanduser().resolve()


def trial_config(app: dict[str, Any], output_dir: str | Path) -> TrialConfig:
    """The ``TrialConfig`` held by a resolved app config (a plain dict), writing to ``output_dir``."""
    sections = {k: app[k] for k in SECTIONS}
    return TrialConfig.from_dict({**sections, "output_dir": str(output_dir), "export_prefix": app["export_prefix"]})
