"""Running a trial's workers as a Ray Train ``TorchTrainer`` (Train V2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import TrialConfig

# Ray Train's own INFO lines ("Reporting training result ...") drown the trial's progress.
RAY_TRAIN_LOG_LEVEL = "WARNING"
# Set in the environment of a local Ray this process starts (its raylet, and so every worker,
# inherits it; a per-trainer runtime_env would cost each trial fresh worker processes, ~4 s).
# On a cluster the launch/ recipes set the first on the nodes or in the job's runtime env.
LOCAL_RAY_ENV = {
    # Train V2 routes print() through the root logger *and* the original stream: every line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The Train controller polls its workers every 2 s by default: a finished trial holds its
    # CPUs for 1 s on average before the next trial may start. Locally the poll is cheap.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


_context = None  # what ray.init returned in this process (its dashboard URL)


def ensure_ray(address: str | None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Connect to ``address``, else to ``$RAY_ADDRESS`` (set by ``ray job submit``), else start a
    new local Ray; nothing when this process is already connected.

    ``log_to_driver``: forward the workers' output to this process (a sweep prints its own one
    line per trial event instead). Returns True when this call started a local Ray (its
    resources are all there will be).
    """
    global _context
    import ray

    if ray.is_initialized():
        return False
    # A local Ray starts its dashboard (localhost only, ray[default]): it serves the State API
    # that Ray Train's placement-group cleaner polls; without it that cleaner warns every few seconds.
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": log_to_driver}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        kwargs["address"] = "local"  # never attach by accident to another process's local Ray
        # advertised on loopback only (the dashboard and agents then listen there too)
        kwargs["_node_ip_address"] = "127.0.0.1"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        secure_local_token()
    _context = ray.init(**kwargs)
    return kwargs["address"] == "local"


def secure_local_token() -> None:
    """The token of a local Ray's token authentication (on by default in Ray 2.60, which writes
    ``~/.ray/auth_token`` with the umask's permissions, 0644): created ``0600``, or tightened to it,
    before Ray reads it. Nothing when the user set ``RAY_AUTH_MODE`` or ``RAY_AUTH_TOKEN``."""
    if os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def dashboard_url() -> str | None:
    """``http://host:port`` of the Ray dashboard this process connected through, if any."""
    url = getattr(_context, "dashboard_url", None)
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def check_local_capacity(trainer, extra_cpus: float = 0.0) -> None:
    """Before a local Ray starts: fail now, in a second, if one trial's workers need more CPUs (GPUs)
    than this machine has. Nothing to check when joining a cluster (its autoscaler may add nodes)
    or when Ray is already up (``check_fits`` asks it)."""
    import sys

    from .config import TrialConfigError

    ray = sys.modules.get("ray")
    if trainer.num_workers == 0 or trainer.ray_address or os.environ.get("RAY_ADDRESS") or (
            ray is not None and ray.is_initialized()):
        return
    if trainer.use_gpu:
        import torch

        need, have, kind, key = trainer.num_workers * trainer.gpus_per_worker, torch.cuda.device_count(), "GPU", \
            "gpus_per_worker"
    else:
        need, have, kind, key = (trainer.num_workers * trainer.cpus_per_worker + extra_cpus, os.cpu_count() or 1,
                                 "CPU", "cpus_per_worker")
    if need > have + 1e-9:
        raise TrialConfigError(
            f"trainer.num_workers={trainer.num_workers} x trainer.{key} needs {need:g} {kind}(s) per trial but this "
            f"machine has {have:g}; lower trainer.num_workers or trainer.{key}, or set trainer.ray_address")


def check_fits(trainer, local: bool, extra_cpus: float = 0.0) -> None:
    """On a local Ray (no autoscaler to add nodes), fail now if one trial's workers can never be
    placed, instead of letting Ray Train wait for resources forever."""
    import ray

    from .config import TrialConfigError

    if not local or trainer.num_workers == 0:
        return
    have = ray.cluster_resources()
    if trainer.use_gpu:
        need, kind, key = trainer.num_workers * trainer.gpus_per_worker, "GPU", "gpus_per_worker"
    else:
        need, kind, key = trainer.num_workers * trainer.cpus_per_worker + extra_cpus, "CPU", "cpus_per_worker"
    if need > have.get(kind, 0) + 1e-9:
        raise TrialConfigError(
            f"trainer.num_workers={trainer.num_workers} x trainer.{key} needs {need:g} {kind}(s) per trial but this "
            f"machine's Ray has {have.get(kind, 0):g}; lower trainer.num_workers or trainer.{key}"
        )


def storage_of(cfg: TrialConfig) -> str:
    """Where Ray Train persists the trial's checkpoints (``trainer.storage_path``, else ``<output_dir>/ray``)."""
    return cfg.trainer.storage_path or str(Path(cfg.output_dir) / "ray")


def run_name_of(cfg: TrialConfig) -> str:
    """The Ray Train run's name: a function of the trial id, so a restarted trial finds its checkpoints."""
    return f"trial-{cfg.tracking.trial_id}"


def fit(cfg: TrialConfig, payload: dict[str, Any], run_name: str, callbacks: list | None = None) -> dict[str, Any]:
    """Run ``qat_worker`` on ``cfg.trainer.num_workers`` Ray Train workers; rank 0's last report."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .workflow import qat_worker

    t = cfg.trainer
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    storage = storage_of(cfg)
    trainer = TorchTrainer(
        qat_worker,
        train_loop_config={**payload, "checkpoint_root": f"{storage.rstrip('/')}/{run_name}"},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level=RAY_TRAIN_LOG_LEVEL),
        ),
    )
    result = trainer.fit()
    # Train V2's Result.metrics are those reported with the latest checkpoint: the workflow's
    # final report carries one for this reason.
    return dict(result.metrics or {})
