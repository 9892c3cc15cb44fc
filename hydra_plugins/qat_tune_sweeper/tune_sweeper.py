"""``TuneSweeper``: Hydra's ``Sweeper`` interface over ``orchestrator.sweep.driver``."""

from __future__ import annotations

from typing import Any, Optional

from hydra.plugins.sweeper import Sweeper


class TuneSweeper(Sweeper):
    """Runs every point of a Hydra ``-m`` sweep as one Ray Tune run with one MLflow parent run.

    Hydra's launcher is not used: Tune places and runs the trials; each trial composes its own
    config with Hydra's config loader (``orchestrator.sweep.compose``).
    """

    def __init__(self, params: Optional[dict[str, str]] = None) -> None:
        self.params = dict(params or {})
        self.hydra_context: Any = None
        self.config: Any = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def sweep(self, arguments: list[str]) -> Any:
        from orchestrator.sweep.driver import run_from_hydra

        preset = [f"{key}={value}" for key, value in self.params.items()]
        return run_from_hydra(self.hydra_context.config_loader, self.config, [*preset, *arguments])
