"""What each trial asks Ray for, and how many trials run at once.

- One worker (or none): the trial trains in its Tune trial actor, which asks for the worker's
  resources, ``trainer.cpus_per_worker`` CPUs and, with ``trainer.use_gpu``,
  ``trainer.gpus_per_worker`` GPUs (a fraction packs several small trials onto one GPU).
- More workers: the actor only drives a TorchTrainer, whose workers get their own placement
  group; the actor asks for ``sweep.trial_driver_cpus`` (0: a token amount of memory, since
  Tune refuses an empty request and a token CPU share would make 2 trials need 2.001 CPUs).

Concurrency defaults to what the cluster holds: total GPUs (CPUs) // per-trial GPUs (CPUs).
"""

from __future__ import annotations

import math

from ..train.config import TrialConfig
from .spec import SweepSpec

DRIVER_TOKEN = {"CPU": 0, "memory": float(1 << 20)}


def in_actor(cfg: TrialConfig) -> bool:
    return cfg.trainer.num_workers <= 1


def trial_resources(cfg: TrialConfig, spec: SweepSpec) -> dict[str, float]:
    t = cfg.trainer
    if in_actor(cfg):
        resources = {"CPU": float(t.cpus_per_worker)}
        if t.use_gpu:
            resources["GPU"] = float(t.gpus_per_worker)
        return resources
    return {"CPU": float(spec.trial_driver_cpus)} if spec.trial_driver_cpus > 0 else dict(DRIVER_TOKEN)


def per_trial(cfg: TrialConfig, spec: SweepSpec) -> tuple[str, float]:
    """``(resource, amount)`` that bounds how many trials fit: GPUs with ``use_gpu``, else CPUs."""
    t = cfg.trainer
    workers = max(t.num_workers, 1)
    if t.use_gpu:
        return "GPU", workers * t.gpus_per_worker
    driver = 0.0 if in_actor(cfg) else spec.trial_driver_cpus
    return "CPU", workers * t.cpus_per_worker + driver


def max_concurrent(cfg: TrialConfig, spec: SweepSpec, cluster: dict[str, float]) -> int:
    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    kind, need = per_trial(cfg, spec)
    return max(1, math.floor(cluster.get(kind, 0.0) / need + 1e-9))
