"""Command-line entry points: ``qat-train`` and ``qat-sweep`` (Hydra apps), ``qat-compare``.

Configuration errors end the program with one line on stderr (``error: <key>=<value> ...
allowed: ...``) and exit status 2, before Ray or MLflow start and before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from .app_config import output_root, register_schemas, trial_config

# conf/ sits beside the package in a checkout (an absolute path: Hydra would read a relative
# path from a packaged module as a Python package name).
CONF_PATH = str(Path(__file__).resolve().parent.parent / "conf")
register_schemas()


def fail(message: Any, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _config_errors() -> tuple[type[Exception], ...]:
    from .quant import QuantError
    from .train.config import TrialConfigError
    from .zoo.registry import RegistryError

    return TrialConfigError, QuantError, RegistryError


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # OmegaConf: missing mandatory value, bad interpolation
        fail(str(exc).splitlines()[0])


def train_summary(result) -> str:
    m = result.metrics
    fp32, ptq, qat = m["fp32_acc"], m["ptq_acc"], m["test_acc"]
    cfg = result.config
    rows = [("FP32", fp32, None), (f"PTQ  W{cfg.quant.param_bw}A{cfg.quant.output_bw}", ptq, ptq - fp32),
            (f"QAT  {cfg.qat.epochs} epoch(s), {'range learning' if cfg.qat.range_learning else 'static'}",
             qat, qat - fp32)]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  test acc   Δ vs FP32"]
    lines += [f"{name:{width}}  {acc:7.2f}%   {'' if d is None else f'{d:+.2f}'}" for name, acc, d in rows]
    lines.append(f"export: {m.get('export_dir')}  (.pth, .onnx, .encodings)")
    lines.append(f"MLflow: run {result.run_id}, experiment '{cfg.tracking.experiment}', {result.tracking_uri}")
    if result.tracking_uri.startswith("sqlite:"):
        lines.append(f"        open with: mlflow ui --backend-store-uri {result.tracking_uri}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
def _train_app(cfg: DictConfig) -> None:
    app = _resolve(cfg)
    from .tracking.mlflow_runs import default_tracking_uri
    from .train.launcher import TrialFailed, run_trial

    root = output_root(app)
    errors = _config_errors()
    try:
        trial = trial_config(app, root / "train" / app["name"])
        if not trial.tracking.uri:
            trial.tracking.uri = default_tracking_uri(root)
        trial.tracking.run_name = trial.tracking.run_name or app["name"]
        result = run_trial(trial)
    except errors as exc:
        fail(exc)
    except TrialFailed as exc:
        fail(exc, status=1)
    print(train_summary(result), flush=True)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="sweep")
def _sweep_app(cfg: DictConfig) -> None:
    app = _resolve(cfg)
    from .sweep.runner import format_table, run_sweep
    from .sweep.spec import SweepSpec
    from .train.config import TrialConfigError

    errors = _config_errors()
    root = output_root(app)
    try:
        spec = SweepSpec(**app["sweep"])
        base = trial_config(app, root / "sweeps" / spec.name / "qat" / "_base")
        outcome = run_sweep(base, spec, root)
    except errors as exc:
        fail(exc)
    except TypeError as exc:  # an unknown key under sweep (the schema normally catches it first)
        fail(TrialConfigError(f"sweep: {exc}"))
    except KeyboardInterrupt:
        fail("sweep interrupted; continue it with the same command plus sweep.resume=true", status=130)
    print(format_table(outcome, spec.metric), flush=True)
    best = outcome.best
    if best is not None:
        print(f"best trial: {best['trial']} ({best['point']}): test_acc {best['test_acc']:.2f}%, "
              f"export in {best['export_dir']}")
    print(f"MLflow: parent run {outcome.parent_run_id} at {outcome.tracking_uri}\n"
          f"compare: qat-compare --sweep {spec.name} --tracking-uri {outcome.tracking_uri}")
    if outcome.interrupted:
        fail("sweep interrupted before every trial finished; continue it with the same command plus "
             "sweep.resume=true", status=130)


def train_main() -> None:
    _train_app()


def sweep_main() -> None:
    _sweep_app()


def compare_main(argv: list[str] | None = None) -> None:
    from .tracking.compare_cli import main

    sys.exit(main(argv))
