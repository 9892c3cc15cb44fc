"""The ``hydra/sweeper: tune`` config node (Hydra's ConfigStore)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TuneSweeperConf:
    """``params``: the search space in Hydra's sweep grammar, ``key: "a,b"`` / ``"interval(0,1)"``
    (as in Hydra's basic and Optuna sweepers); command-line overrides of a key replace it.
    How Tune searches it is the app's ``sweep`` node."""

    _target_: str = "hydra_plugins.qat_tune_sweeper.tune_sweeper.TuneSweeper"
    params: Optional[dict[str, str]] = field(default_factory=dict)


def register_sweeper_config() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/sweeper", name="tune", node=TuneSweeperConf,
                                 provider="qat-orchestrator")


register_sweeper_config()
