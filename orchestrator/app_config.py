"""The Hydra schema of the CLI apps: the trial sections plus output paths and the sweep node.

Registered in Hydra's ConfigStore as ``qat_app_schema``; the primary configs in
``conf/`` (shipped as the package ``orchestrator.conf``) list it first in their defaults, so every override is
type-checked and unknown keys are rejected. Values are checked again, semantically, by
``TrialConfig.validate`` / ``SweepSpec.validate`` before Ray starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import check_writable_dir
from .sweep.spec import SweepSpec
from .train.analyze_config import AnalyzeSpec
from .train.config import SECTIONS, TrialConfig, TrialConfigError, TrialSections

@dataclass
class PathsSpec:
    """``root``: where runs, sweeps and the default MLflow database (``mlflow.db``) live."""

    root: str = "outputs"


@dataclass
class AppConfig(TrialSections):
    """``name``: the run's directory under ``<paths.root>/train`` (``qat-train``; ``qat-analyze``:
    under ``<paths.root>/analyze``). ``sweep``: how ``qat-sweep`` and ``qat-train -m`` search
    (``SweepSpec``). ``analyze``: what ``qat-analyze`` measures (``AnalyzeSpec``; one schema for
    the three apps, so ``qat-analyze`` composes exactly ``qat-train``'s config)."""

    paths: PathsSpec = field(default_factory=PathsSpec)
    name: str = "qat-train"
    sweep: SweepSpec = field(default_factory=SweepSpec)
    analyze: AnalyzeSpec = field(default_factory=AnalyzeSpec)


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


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,:=+-]*")


def output_root(app: dict[str, Any]) -> Path:
    """``paths.root``, absolute; it must be (or be creatable as) a writable directory."""
    root = Path(app["paths"]["root"]).expanduser().resolve()
    try:
        check_writable_dir(root, "paths.root")
    except ValueError as exc:
        raise TrialConfigError(str(exc)) from None
    return root


def check_run_name(root: Path, name: Any, under: str = "train") -> Path:
    """``<root>/<under>/<name>``: ``name`` is one plain path component (no ``/``, no ``..``), so a
    run can never write outside ``paths.root``. ``under``: ``train`` (qat-train), ``analyze``."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise TrialConfigError(f"name={name!r} is not allowed; allowed: letters, digits and _ . , : = + - "
                               f"(one directory name under paths.root/{under})")
    run_dir = (root / under / name).resolve()
    if not run_dir.is_relative_to(root):  # a symbolic link out of the root
        raise TrialConfigError(f"name={name!r}: {run_dir} is outside paths.root={str(root)!r}")
    return run_dir


def trial_config(app: dict[str, Any], output_dir: str | Path) -> TrialConfig:
    """The ``TrialConfig`` held by a resolved app config (a plain dict), writing to ``output_dir``."""
    sections = {k: app[k] for k in SECTIONS}
    return TrialConfig.from_dict({**sections, "output_dir": str(output_dir), "export_prefix": app["export_prefix"]})
