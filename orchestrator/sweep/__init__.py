"""Sweeps: Hydra's sweep grammar -> one Ray Tune run (search, schedulers, resume) -> MLflow.

``hydra_plugins/qat_tune_sweeper`` adapts ``driver.run_from_hydra`` to Hydra's Sweeper interface:
``space`` (grammar -> dimensions), ``compose`` (a trial's config, composed by Hydra), ``plan``
(validation), ``runner`` (Tuner, parent run), ``trial`` (the trainable), ``progress`` (console,
labels), ``lifecycle`` (signals, resume), ``finish`` (table, plot, registry).
"""
