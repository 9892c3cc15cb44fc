"""What the command-line programs print: one-line errors, colour only on a terminal, and the
libraries' own chatter (Ray, Tune, MLflow) off unless asked for.

``quiet_libraries`` sets environment variables before Ray starts, so a local Ray's processes
(and with them every trial actor and Ray Train worker) inherit them:

- ``RAY_AIR_NEW_OUTPUT=0``: Tune's legacy reporter, silent at ``verbose=0`` (the new one draws
  a configuration box and a TensorBoard hint at any verbosity);
- ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``: no CSV/JSON/TensorBoard result files per trial
  (results live in MLflow);
- ``MLFLOW_LOGGING_LEVEL=WARNING``: no table-creation and monitor INFO lines;
  ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false``: no download progress bars;
- Ray's Python logger at ERROR, Tune's and Train's at CRITICAL (a failed trial is one line of
  ours, its traceback in the trial's ``error.txt``); trial output is not forwarded to the driver
  (``ray.init(log_to_driver=False)``, see ``train/ray_launcher.py``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, NoReturn

QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def quiet_libraries(verbose: bool = False) -> None:
    """Silence Ray, Tune and MLflow unless ``verbose`` (call before they are imported/started)."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("ray").setLevel(logging.ERROR)
    for name in ("ray.tune", "ray.train", "ray.air"):  # a failed trial's traceback: one line of ours instead
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


WORKER_LINE = re.compile(r"^\((?P<actor>[\w.]+) pid=\d+(?:, ip=[\w.:-]+)?\) (?P<text>.*)$", re.DOTALL)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class WorkerLines:
    """A stream wrapper for a program that forwards Ray workers' output (``qat-train`` on Ray
    Train): a trial's own lines (``[run name] ...`` from a Ray Train worker) are printed without
    Ray's coloured ``(RayTrainWorker pid=...)`` prefix; every other line a Ray actor prints (the
    Train controller's, core-worker warnings) is dropped; the program's own lines pass unchanged."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            kept = self._kept(line)
            if kept is not None:
                self.stream.write(kept + "\n")
        return len(text)

    @staticmethod
    def _kept(line: str) -> str | None:
        m = WORKER_LINE.match(ANSI.sub("", line))
        if m is None:
            return line
        return m["text"] if m["actor"] == "RayTrainWorker" and m["text"].startswith("[") else None

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def filter_worker_lines(verbose: bool = False) -> None:
    """Route this process's stdout and stderr through ``WorkerLines`` (unless ``verbose``)."""
    if verbose or isinstance(sys.stdout, WorkerLines):
        return
    sys.stdout = WorkerLines(sys.stdout)
    sys.stderr = WorkerLines(sys.stderr)


COLORS = {"red": "31", "green": "32", "yellow": "33"}


def use_color(stream=None) -> bool:
    """Colour only on a terminal (never in a pipe or a log file), and never with ``NO_COLOR``."""
    stream = stream or sys.stdout
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def paint(text: str, color: str) -> str:
    return f"\033[{COLORS[color]}m{text}\033[0m" if use_color() else text


def fail(message: Any, status: int = 2) -> NoReturn:
    """Print ``error: <message>`` (one line) on stderr and exit with ``status``."""
    text = " ".join(str(message).split("\n")).strip()
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(status)


def debugging() -> bool:
    """``QAT_DEBUG=1``: tracebacks of unexpected errors (otherwise one line)."""
    return os.environ.get("QAT_DEBUG", "") not in ("", "0")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def fail_unexpected(exc: BaseException, what: str, status: int = 1) -> NoReturn:
    """An error no check foresaw (a full disk, a dying server): one line naming ``what`` failed and
    why, the traceback too with ``QAT_DEBUG=1``, exit ``status``."""
    if debugging():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if debugging() else " (QAT_DEBUG=1 shows the traceback)"
    fail(f"{what} failed: {first_line(exc)}{hint}", status=status)
