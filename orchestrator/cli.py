"""Command-line entry points: ``qat-train``, ``qat-sweep`` and ``qat-analyze`` (Hydra apps), ``qat-compare``.

Their configs live in the top-level ``conf/`` and ship as the package ``orchestrator.conf``
(setup.py), so an installed wheel finds them.
``qat-sweep`` and ``qat-train -m`` sweep through the Hydra sweeper ``tune``
(``hydra_plugins/qat_tune_sweeper``, ``orchestrator/sweep``). Configuration errors end the
program with one line on stderr (``error: <key>=<value> ... allowed: ...``) and exit status 2,
before Ray or MLflow start and before anything is written.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from . import interrupts
from .app_config import check_run_name, output_root, register_schemas, trial_config
from .console import fail, fail_unexpected, filter_worker_lines, quiet_libraries

register_schemas()


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
    """FP32, PTQ and QAT side by side on the test split, every metric of the task, and the
    change of the primary one against FP32."""
    from .tracking.links import ui_command
    from .train.builders import task_of

    m, cfg = result.metrics, result.config
    task = task_of(cfg.task)
    names = [t.name for t in task.metrics]
    from .train.labels import bits_label, mode_text

    distill = ", distilled" if cfg.qat.distill.enabled else ""
    rows = [("FP32", "fp32"), (f"PTQ {bits_label(cfg).upper()}", "ptq"),
            (f"QAT {cfg.qat.epochs} epoch(s), {mode_text(cfg)}{distill}", "test")]
    width = max(len(r[0]) for r in rows)
    header = f"{'test split':{width}}  " + "  ".join(f"{n:>9}" for n in names) + f"  {task.primary + ' vs FP32':>14}"
    lines = [header]
    for label, stage in rows:
        values = "  ".join(f"{m.get(f'{stage}_{n}', float('nan')):9.2f}" for n in names)
        delta = "" if stage == "fp32" else f"{m[f'{stage}_{task.primary}'] - m[f'fp32_{task.primary}']:+14.2f}"
        lines.append(f"{label:{width}}  {values}  {delta}")
    lines.append(f"export: {m.get('export_dir')}  (.pth, .onnx, .encodings)")
    lines.append(f"MLflow: run {result.run_id}, experiment '{cfg.tracking.experiment}', {result.tracking_uri}")
    command = ui_command(result.tracking_uri)
    if command:
        lines.append(f"        open with: {command}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _train_app(cfg: DictConfig) -> None:
    interrupts.install()  # SIGTERM ends the run as Ctrl-C does: runs KILLED, temporary files removed
    app = _resolve(cfg)
    quiet_libraries(app["sweep"]["verbose"])
    filter_worker_lines(app["sweep"]["verbose"])  # Ray Train's workers: the trial's own lines, unprefixed
    from .tracking.mlflow_runs import default_tracking_uri
    from .train.launcher import TrialFailed, run_trial

    errors = _config_errors()
    try:
        root = output_root(app)
        run_dir = check_run_name(root, app["name"])
        trial = trial_config(app, run_dir)
        if not trial.tracking.uri:
            trial.tracking.uri = default_tracking_uri(root)
        trial.tracking.run_name = trial.tracking.run_name or app["name"]
        result = run_trial(trial)
    except errors as exc:
        fail(exc)
    except TrialFailed as exc:
        fail(exc, status=1)
    except KeyboardInterrupt:
        fail(f"qat-train {app['name']} interrupted ({interrupts.STATE.signal_name}); run the same command again to "
             "resume from the last checkpoint", status=interrupts.STATE.exit_status)
    except Exception as exc:  # a full disk, a tracking store that died mid-run, ...
        fail_unexpected(exc, f"qat-train {app['name']}")
    print(train_summary(result), flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def _analyze_app(cfg: DictConfig) -> None:
    interrupts.install()
    app = _resolve(cfg)
    quiet_libraries(app["sweep"]["verbose"])
    from .tracking.mlflow_runs import default_tracking_uri
    from .tracking.source import source_tags
    from .train.analyze import run_analysis
    from .train.analyze_config import AnalyzeSpec

    errors = _config_errors()
    try:
        root = output_root(app)
        out_dir = check_run_name(root, app["name"], under="analyze")
        trial = trial_config(app, out_dir)
        if not trial.tracking.uri:
            trial.tracking.uri = default_tracking_uri(root)
        trial.tracking.run_name = trial.tracking.run_name or app["name"]
        result = run_analysis(trial, AnalyzeSpec(**app["analyze"]), log=lambda msg: print(msg, flush=True),
                              tags=source_tags())
    except errors as exc:
        fail(exc)
    except KeyboardInterrupt:
        fail(f"qat-analyze {app['name']} interrupted ({interrupts.STATE.signal_name})",
             status=interrupts.STATE.exit_status)
    except Exception as exc:  # a full disk, a tracking store that died mid-run, ...
        fail_unexpected(exc, f"qat-analyze {app['name']}")
    print(result.summary(limit=ANALYZE_ROWS_SHOWN), flush=True)


ANALYZE_ROWS_SHOWN = 40  # rows of the table qat-analyze prints (the CSV holds them all)


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def _sweep_app(cfg: DictConfig) -> None:
    # qat-sweep runs in Hydra's MULTIRUN mode (its config sets hydra.mode), where the Tune
    # sweeper (hydra_plugins/qat_tune_sweeper) runs the trials and this function is not called.
    fail("qat-sweep always sweeps: leave hydra.mode at MULTIRUN (use qat-train for a single trial)")


# Flags after which Hydra prints something and exits, or that choose another config: Hydra alone
# handles those command lines.
HYDRA_OWN_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc",
                   "--version", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                   "--experimental-rerun")


QUOTING_HINT = ("; quote a value with spaces, non-ASCII or special characters inside the argument, e.g. "
                "'model.checkpoint=\"/data/modèle v2.pt\"'")


def check_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config with the command line's plain overrides (sweeps left to the sweeper)
    before Hydra runs, so that Hydra's own refusals (an unknown key, a wrong type, a missing config
    group option) end as one ``error:`` line with exit status 2, not Hydra's multi-line report."""
    if any(a.split("=", 1)[0] in HYDRA_OWN_FLAGS for a in argv):
        return
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .sweep.space import one_line

    lines = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as exc:  # Hydra's grammar
        fail(one_line(exc) + QUOTING_HINT)
    plain = [o.input_line for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()
             and not o.get_key_element().startswith("hydra")]
    try:
        with initialize_config_module("orchestrator.conf", version_base="1.3"):
            compose(config_name, overrides=plain)
    except Exception as exc:
        fail(one_line(exc))


OPEN_ARGS = re.compile(r"(model|data|task)\.args\.[^=]+=")


def open_args(argv: list[str]) -> list[str]:
    """``data.args.root=/data`` -> ``++data.args.root=/data``: the keys under ``model.args``,
    ``data.args`` and ``task.args`` are a builder's own arguments (open mappings), so setting one
    adds it or overrides it, without Hydra's ``+`` for keys the group file did not list."""
    return [f"++{a}" if OPEN_ARGS.match(a) else a for a in argv]


def train_main() -> None:
    sys.argv[1:] = open_args(sys.argv[1:])
    check_overrides("train", sys.argv[1:])
    _train_app()


def sweep_main() -> None:
    sys.argv[1:] = open_args(sys.argv[1:])
    check_overrides("sweep", sys.argv[1:])
    _sweep_app()


def analyze_main() -> None:
    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        fail("qat-analyze analyses one config: run it once per config (no -m)")
    sys.argv[1:] = open_args(sys.argv[1:])
    check_overrides("analyze", sys.argv[1:])
    _analyze_app()


def compare_main(argv: list[str] | None = None) -> None:
    from .tracking.compare_cli import main

    sys.exit(main(argv))
