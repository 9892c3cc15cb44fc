"""Building small trial configs for tests."""

from __future__ import annotations

from orchestrator.train.config import TrialConfig


def trial_config(tmp_path, cache_dir, name="trial", **overrides) -> TrialConfig:
    """A digits trial (digits_cnn, its 15-epoch baseline; small and quick) writing under
    ``tmp_path/name`` with MLflow at ``tmp_path/mlflow.db``.

    ``overrides``: ``{"qat.epochs": 2, "trainer.num_workers": 0, ...}``.
    """
    cfg = TrialConfig()
    cfg.model.name, cfg.data.name, cfg.model.pretrain_epochs = "digits_cnn", "digits", 15
    cfg.output_dir = str(tmp_path / name)
    cfg.model.cache_dir = cache_dir
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.qat.epochs = 2
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        target = cfg
        for part in section.split(".") if section else []:
            target = getattr(target, part)
        setattr(target, field, value)
    return cfg
