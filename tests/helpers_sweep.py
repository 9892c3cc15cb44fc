"""Hydra's real config loader and master config for qat-sweep / qat-train, without running them."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def hydra_app(config_name: str = "sweep", overrides: tuple[str, ...] = ()):
    """``(config_loader, master_config)`` as Hydra hands them to the sweeper (plain overrides only)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.app_config import register_schemas

    register_schemas()
    with initialize_config_module("orchestrator.conf", version_base="1.3"):
        master = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        yield GlobalHydra.instance().config_loader(), master


def sweep_runs(uri: str, sweep_name: str):
    """``(client, the sweep's parent run, its child runs)`` in the MLflow store at ``uri``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("qat")
    only = f"tags.`qat.kind` = 'sweep' and tags.`qat.sweep_name` = '{sweep_name}'"
    (parent,) = client.search_runs([exp.experiment_id], filter_string=only)
    kids = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, kids


def sqlite(root) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"
