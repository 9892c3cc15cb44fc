"""Hydra sweeper plugin ``tune``: a whole ``-m`` sweep as one Ray Tune run (``qat-sweep``, ``qat-train -m``).

Hydra discovers plugins in the ``hydra_plugins`` namespace package; the sweeping itself lives in
``orchestrator.sweep`` (this package only adapts it to Hydra's ``Sweeper`` interface).
"""
