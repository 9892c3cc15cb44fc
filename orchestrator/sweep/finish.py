"""The end of a sweep, from MLflow: ranked table, plot and CSV on the parent run, the best trial
tagged (``best_run_id``) and registered in the Model Registry, the parent closed.

The table is ``qat-compare``'s (``tracking/compare.py``): one implementation, one set of
metric names.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..tracking.compare import Sweep, TrialRow, format_rows, rank, trial_rows, write_csv
from ..tracking.mlflow_runs import RunLogger
from ..tracking.plot import write_plot
from .runner import SweepRun

REGISTERED_RUN_TAG = "qat.registered_run_id"  # the trial whose model the parent registered (once)


@dataclass
class SweepResult:
    rows: list[TrialRow]
    best: TrialRow | None
    registered: tuple[str, str] | None  # (registered model name, version)
    table: str


def finish(run: SweepRun) -> SweepResult:
    spec = run.plan.spec
    uri = run.tracking_uri
    swept = [d.key.lstrip("+~") for d in run.plan.space.dims]
    sweep = Sweep(spec.name, run.parent_run_id, swept, spec.metric, None, spec.mode, spec.tie_on_samples)
    rows = rank(trial_rows(uri, sweep))
    best = rows[0] if rows and rows[0].finished else None
    parent = RunLogger(uri, run.parent_run_id)
    with tempfile.TemporaryDirectory(prefix="qat-sweep-") as tmp:
        write_csv(rows, Path(tmp) / f"{spec.name}.csv")
        write_plot(rows, swept, Path(tmp) / f"{spec.name}.png", f"sweep {spec.name}")
        parent.log_artifacts(tmp, "comparison")
    registered = None
    if best is not None:
        m = sweep.base
        # the best trial's numbers under the children's names too: the UI's runs table opens on the
        # collapsed parent row, whose columns then show the sweep's result instead of '-'
        parent.log_metrics({f"best_val_{m}": best.val, f"best_test_{m}": best.test, f"fp32_{m}": best.fp32,
                            f"ptq_{m}": best.ptq, f"val_{m}": best.val, f"test_{m}": best.test}, step=0)
        tags = {"best_run_id": best.run_id, "best_run_name": best.name}
        earlier = parent.tags()
        if spec.register_best and earlier.get(REGISTERED_RUN_TAG) == best.run_id:  # a resumed, already finished sweep
            name, _, version = earlier["registered_model"][len("models:/"):].rpartition("/")
            registered = (name, version)
        elif spec.register_best:
            from ..tracking.registry import register_trial_model

            version = register_trial_model(
                uri, best.run_id, spec.registered_model, run.plan.base.export_prefix,
                tags={"sweep": spec.name, "bits": best.bits, "mode": best.mode, f"val_{m}": f"{best.val:.4g}",
                      f"test_{m}": f"{best.test:.4g}", f"ptq_{m}": f"{best.ptq:.4g}", f"fp32_{m}": f"{best.fp32:.4g}"},
                description=f"best of sweep {spec.name} by {spec.metric}: {best.name}")
            registered = (spec.registered_model, version)
            tags["registered_model"] = f"models:/{spec.registered_model}/{version}"
            tags[REGISTERED_RUN_TAG] = best.run_id
        parent.set_tags(tags)
    counts = {o: sum(r.outcome == o for r in rows) for o in {r.outcome for r in rows}}
    tags = {f"qat.trials_{o}": str(n) for o, n in counts.items()}
    if best is None:  # nothing to show for the sweep: it failed
        parent.end("failed", "no trial finished", tags=tags)
    else:
        parent.end("finished", tags=tags)
    return SweepResult(rows, best, registered, format_rows(rows, spec.metric))


def best_line(result: SweepResult, metric: str) -> str:
    b = result.best
    if b is None:
        return "no trial finished"
    gain = "" if math.isnan(b.gain) else f", gain over PTQ {b.gain:+.2f}"
    return (f"best: {b.name} ({metric} {b.val:.2f}, test_{b.metric} {b.test:.2f}, FP32 {b.fp32:.2f}, "
            f"PTQ {b.ptq:.2f}{gain}), run {b.run_id}")
