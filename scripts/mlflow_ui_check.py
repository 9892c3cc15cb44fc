"""Look at a finished sweep in the real MLflow UI, in headless Chromium, and check what a reader sees.

    .venv/bin/python scripts/mlflow_ui_check.py --tracking-uri sqlite:///$PWD/outputs/mlflow.db \
        --sweep default --out outputs/ui

Serves the store with ``mlflow server`` on a free loopback port, opens the link the sweep
printed (the runs table in the model-training view, the sweep's saved view) in Debian's
``chromium`` (``$QAT_CHROMIUM`` to use another) driven by Playwright, with a fresh profile,
expands the sweep's parent run and saves a screenshot. Checks, on the rendered page:

- the runs table is nested: the trials are hidden under the parent run until it is expanded;
- every run name is readable (shown whole, as MLflow holds it);
- the metric columns (``val_<m>``, ``test_<m>``, ``ptq_<m>``, ``fp32_<m>`` for the sweep's metric
  ``m``, e.g. ``val_acc``) are there.

Prints one line per finding; exit status 0 when all hold, 1 otherwise (2: cannot run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return os.environ.get("QAT_CHROMIUM") or shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError("mlflow server did not answer within 180 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def check(uri: str, sweep: str, out: Path, experiment: str = "qat") -> list[tuple[bool, str]]:
    """Render the sweep's runs table; ``[(ok, finding), ...]``. Writes ``out/mlflow-runs.png``."""
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from orchestrator.tracking.links import VIEW_STAGES, runs_url

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`qat.kind` = 'sweep' and "
                                                                      f"tags.`qat.sweep_name` = '{sweep}'")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    metric = parent.data.params.get("sweep.metric", "val_acc")[len("val_"):]
    view_metrics = [f"{stage}_{metric}" for stage in VIEW_STAGES]
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(uri, port, out / "mlflow-server.log")
    findings: list[tuple[bool, str]] = []
    try:
        url = runs_url(uri, exp.experiment_id, sweep, ui=f"http://127.0.0.1:{port}")
        with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="qat-chromium-") as profile:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1700, "height": 900})
            page = context.new_page()
            page.goto(url)
            parent_link = page.get_by_role("link", name=parent.info.run_name, exact=True)
            parent_link.wait_for(timeout=90_000)
            names = [c.info.run_name for c in children]
            hidden = [n for n in names if page.get_by_text(n, exact=True).count() == 0]
            findings.append((len(hidden) == len(names),
                             f"nested: {len(hidden)}/{len(names)} trials hidden under '{parent.info.run_name}' "
                             "until it is expanded"))
            row = page.get_by_role("row").filter(has=parent_link)
            row.get_by_role("button").first.click()
            page.get_by_role("link", name=names[0], exact=True).wait_for(timeout=30_000)
            close = page.get_by_role("button", name="Close")  # the assistant side panel, if shown
            if close.count():
                close.first.click()
            time.sleep(1.0)
            page.screenshot(path=str(out / "mlflow-runs.png"))
            shown = [n for n in names if _shown_whole(page.get_by_role("link", name=n, exact=True))]
            findings.append((len(shown) == len(names), f"run names readable: {len(shown)}/{len(names)} shown whole, "
                                                        f"not cut off (e.g. '{names[0]}')"))
            headers = {h.strip() for h in page.get_by_role("columnheader").all_inner_texts()}
            missing = [m for m in view_metrics if not any(m in h for h in headers)]
            findings.append((not missing, f"metric columns: {', '.join(view_metrics)}"
                                          + (f" (missing: {', '.join(missing)})" if missing else "")))
            context.close()
    finally:
        stop(server)
    findings.append((True, f"screenshot: {out / 'mlflow-runs.png'}"))
    return findings


def _shown_whole(link) -> bool:
    """The name is on the page and nothing in its table cell is clipped (cut off with an ellipsis)."""
    if not link.count():
        return False
    return link.first.evaluate("""e => {
        const cell = e.closest('[col-id]') || e, name = e.textContent;
        return [cell, ...cell.querySelectorAll('*')].filter(x => x.textContent.includes(name))
            .every(x => x.scrollWidth <= x.clientWidth + 1); }""")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--sweep", required=True)
    p.add_argument("--out", default="outputs/ui")
    args = p.parse_args(argv)
    if not chromium_path():
        print("error: no chromium on PATH (Debian: apt-get install chromium; or set QAT_CHROMIUM)", file=sys.stderr)
        return 2
    findings = check(args.tracking_uri, args.sweep, Path(args.out).resolve())
    for ok, text in findings:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    return 0 if all(ok for ok, _ in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
