"""``qat-analyze``: the per-quantizer sensitivity of exactly what a trial would quantize.

The simulation is built as a trial builds it, with the trial's own steps: its inputs
(``trial_inputs.build_inputs``, the same seed), its simulation (``ptq_steps.build_sim``, mixed
precision included) and its calibration with ``qat.init``'s PTQ steps
(``ptq_steps.calibrate_with_init``), in this process on one device. Then
``quant.ptq.sensitivity`` measures every enabled quantizer (weights and activations) with only it
on and with all but it on, ranked most sensitive first:

- ``analyze.metric=sqnr`` (the default): the output SQNR against FP32 on the trial's calibration
  batches, in dB; two forward passes of those batches per quantizer, no labels, and the very
  measurement ``quant.mixed`` ranks by, so the table shows what mixed precision would keep high;
- ``analyze.metric=<a metric of the task>`` (``acc``, ``top5``, ``ppl``, ...): that metric on
  ``analyze.split``; two evaluations of the split per quantizer (slower on a large split).

Outputs: ``<paths.root>/analyze/<name>/sensitivity.{csv,png}`` (``tracking/sensitivity_report.py``)
and one MLflow run (tag ``qat.kind=analysis``) holding the same files under ``analysis/``, the
table as MLflow's table view (``analysis/sensitivity_table.json``) and ``config.json``; metrics
``fp32_<m>``/``ptq_<m>`` for every metric of the task on ``analyze.split``, ``ptq_sqnr_db``, the
PTQ steps' ``ptq_*``, ``quantizers``, ``analyze_s``; tag ``qat.most_sensitive`` (the first
``analyze.top_k`` names, comma-separated). Every check a trial makes before it runs is made first
(``launcher.checked``), so a bad config writes nothing and creates no run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..quant.ptq.sensitivity import Sensitivity, quantized_sqnr, render, sensitivity
from .analyze_config import SQNR, AnalyzeSpec
from .builders import task_of
from .config import TrialConfig
from .launcher import checked
from .loops import evaluate
from .ptq_steps import build_sim, calibrate_with_init
from .trial_inputs import build_inputs
from .workflow import prefixed, reseed


@dataclass
class Analysis:
    """What ``measure`` found: ``rows`` most sensitive first; ``fp32``/``ptq``: the task's metrics
    on the split; ``sqnr_db``: the PTQ model's output SQNR; ``init``: the PTQ steps' metrics and
    mixed precision's (``ptq_steps``)."""

    rows: list[Sensitivity]
    fp32: dict[str, float]
    ptq: dict[str, float]
    sqnr_db: float
    batches: int
    init: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {**prefixed("fp32", self.fp32), **prefixed("ptq", self.ptq), "ptq_sqnr_db": self.sqnr_db,
                **self.init, "quantizers": float(len(self.rows)), "analyze_s": self.seconds}


def measure(cfg: TrialConfig, spec: AnalyzeSpec, log: Callable[[str], None] = print) -> Analysis:
    """Build, calibrate (with ``qat.init``) and measure the sensitivity of ``cfg``'s simulation."""
    start = time.perf_counter()
    device = torch.device("cuda" if cfg.trainer.use_gpu else "cpu")
    reseed(cfg.qat.seed, -1, 0)  # the trial's own random state before it builds its inputs
    inputs = build_inputs(cfg, 0, 1, device)
    task, batches = inputs.task, inputs.calibration
    sim, mixed = build_sim(cfg, inputs.model, inputs.dummy, task, batches, log)

    def on_split(model) -> dict[str, float]:
        return evaluate(model, inputs.loaders[spec.split], task, device)

    fp32 = on_split(inputs.model)
    init = calibrate_with_init(cfg.qat, sim, task, batches, lambda: on_split(sim.model), log) | mixed
    ptq = on_split(sim.model)

    def run(model, batch):
        return task.forward(model, batch)

    sqnr = quantized_sqnr(sim, run, batches)
    log(f"FP32 {task.describe(fp32)}  PTQ {task.describe(ptq)} ({spec.split} split); PTQ output SQNR {sqnr:.2f} dB "
        f"on {len(batches)} calibration batch(es); measuring {len(sim.param_quantizers())} weight and "
        f"{len(sim.activation_quantizers())} activation quantizers")
    if spec.metric == SQNR:
        rows = sensitivity(sim, run, batches)
    else:
        mode = next(m.mode for m in task.metrics if m.name == spec.metric)
        rows = sensitivity(sim, run, batches, lambda: on_split(sim.model)[spec.metric], mode)
    return Analysis(rows, fp32, ptq, sqnr, len(batches), init, time.perf_counter() - start)


def describe(spec: AnalyzeSpec, num_batches: int) -> str:
    """What the two score columns measure, in words."""
    if spec.metric == SQNR:
        return f"output SQNR vs FP32 in dB on {num_batches} calibration batch(es)"
    return f"{spec.metric} on the {spec.split} split"


@dataclass
class AnalyzeResult:
    analysis: Analysis
    spec: AnalyzeSpec
    csv: Path
    plot: Path
    run_id: str
    tracking_uri: str
    experiment: str

    def summary(self, limit: int | None = None) -> str:
        """The ranked table (``limit``: its first rows) and where everything went."""
        a, spec = self.analysis, self.spec
        from ..tracking.links import ui_command

        lines = [f"sensitivity of {len(a.rows)} quantizers, most sensitive first (score: {spec.column}; "
                 "'only on': only this quantizer quantized, 'all but': every other one quantized)",
                 render(a.rows, limit)]
        if limit is not None and len(a.rows) > limit:
            lines.append(f"... {len(a.rows) - limit} more in the CSV")
        lines += [f"most sensitive: {', '.join(r.name for r in a.rows[:spec.top_k])}",
                  f"csv: {self.csv}", f"plot: {self.plot}",
                  f"MLflow: run {self.run_id}, experiment '{self.experiment}', {self.tracking_uri}"]
        command = ui_command(self.tracking_uri)
        if command:
            lines.append(f"        open with: {command}")
        return "\n".join(lines)


def run_analysis(cfg: TrialConfig, spec: AnalyzeSpec, log: Callable[[str], None] = print,
                 tags: dict[str, str] | None = None) -> AnalyzeResult:
    """Check ``cfg`` as a trial is checked, open an MLflow run, measure, write the CSV and the plot
    to ``cfg.output_dir``, log them, and close the run (FAILED or KILLED, with the reason, when
    the analysis does not finish). ``tags``: more run tags (the command line)."""
    spec.validate(task_of(cfg.task))
    cfg, _ = checked(cfg, log=log)
    from ..tracking.mlflow_runs import KIND_TAG, RunLogger, create_run
    from ..tracking.run_content import trial_params
    from .labels import bits_label

    run_tags = {KIND_TAG: "analysis", "qat.bits": bits_label(cfg), "qat.model": cfg.model.name,
                "qat.data": cfg.data.name, "qat.task": cfg.task.name, "qat.output_dir": cfg.output_dir,
                **(tags or {})}
    run_id = create_run(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name, run_tags)
    tracker = RunLogger(cfg.tracking.uri, run_id)
    try:
        tracker.log_params({**trial_params(cfg), "analyze.metric": spec.metric, "analyze.split": spec.split})
        tracker.log_dict(cfg.to_dict(), "config.json")
        analysis = measure(cfg, spec, log)
        out = Path(cfg.output_dir)
        csv_path, png_path = out / "sensitivity.csv", out / "sensitivity.png"
        log_results(tracker, analysis, spec, cfg, csv_path, png_path)
    except KeyboardInterrupt:
        from .. import interrupts

        tracker.end("interrupted", f"interrupted ({interrupts.STATE.signal_name})", best_effort=True)
        raise
    except Exception as exc:
        tracker.end("failed", f"{type(exc).__name__}: {exc}", best_effort=True)
        raise
    tracker.end("finished")
    return AnalyzeResult(analysis, spec, csv_path, png_path, run_id, cfg.tracking.uri, cfg.tracking.experiment)


def log_results(tracker, analysis: Analysis, spec: AnalyzeSpec, cfg: TrialConfig, csv_path: Path,
                png_path: Path) -> None:
    """Write the CSV and the plot, then log them, the table view, the metrics and the top names."""
    from ..tracking.sensitivity_report import json_columns, write_csv, write_plot

    primary = task_of(cfg.task).primary
    references: dict[str, Any] = {"PTQ, all on": analysis.sqnr_db}
    if spec.metric != SQNR:
        references = {"FP32": analysis.fp32[spec.metric], "PTQ, all on": analysis.ptq[spec.metric]}
    write_csv(csv_path, analysis.rows, spec.column)
    write_plot(png_path, analysis.rows, spec.column, references,
               f"{cfg.tracking.run_name}: {describe(spec, analysis.batches)}; "
               f"FP32 {primary} {analysis.fp32[primary]:.2f}, PTQ {analysis.ptq[primary]:.2f}")
    tracker.log_metrics(analysis.metrics(), step=0)
    tracker.log_artifacts(csv_path.parent, "analysis")
    tracker.log_table(json_columns(analysis.rows, spec.column), "analysis/sensitivity_table.json")
    tracker.set_tags({"qat.most_sensitive": ",".join(r.name for r in analysis.rows[:spec.top_k])[:5000]})
