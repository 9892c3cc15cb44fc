"""Composing a trial's config with Hydra, in the driver or inside a Ray Tune trial actor.

A ``Composer`` carries Hydra's config loader and the sweep's master config (both picklable;
Hydra's Ray and joblib launchers ship them the same way). ``compose(overrides)`` is what
``qat-train <overrides>`` would compose: config groups, defaults lists, interpolations and the
structured-config schema all apply. The result is a plain dict (configs cross process
boundaries as plain values).
"""

from __future__ import annotations

from typing import Any

from ..train.config import TrialConfigError
from .space import one_line


class Composer:
    def __init__(self, config_loader, master_config) -> None:
        self.config_loader = config_loader
        self.master_config = master_config

    def compose(self, overrides: list[str]) -> dict[str, Any]:
        """The resolved job config (no ``hydra`` node) for ``overrides``; ``TrialConfigError``
        with one line when Hydra or OmegaConf refuse it."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import setup_globals
        from omegaconf import OmegaConf, open_dict

        from ..app_config import register_schemas

        register_schemas()  # a fresh trial actor has an empty ConfigStore and no ${now:} resolver
        setup_globals()
        try:
            cfg = self.config_loader.load_sweep_config(self.master_config, list(overrides))
            HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations, as in a Hydra job
            with open_dict(cfg):
                del cfg["hydra"]
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except TrialConfigError:
            raise
        except Exception as exc:  # ConfigCompositionException, OmegaConf ValidationError, ...
            raise TrialConfigError(one_line(exc)) from None
