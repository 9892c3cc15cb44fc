"""Stopping a sweep honestly: Ctrl-C / SIGTERM, exit status, and the command that resumes it.

The first SIGINT or SIGTERM asks Tune to stop gracefully (it saves the experiment state one
last time; Tune's own SIGINT handler is turned off and its SIGUSR1 handler, installed while
``Tuner.fit`` runs, is called instead, so SIGTERM gets the same treatment). Outside ``fit``,
or on a second signal, ``KeyboardInterrupt`` is raised at once. Either way the sweep exits
with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM) after marking its MLflow runs.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from .. import interrupts
from ..interrupts import STATE


def _handler(signum: int, frame) -> None:
    if STATE.stopping or not STATE.in_fit:
        interrupts.interrupt(signum, frame)
    STATE.signum = signum
    print(f"{signal.Signals(signum).name}: stopping the sweep; Tune saves its state (send it again to stop at once)",
          flush=True)
    tune_handler = signal.getsignal(signal.SIGUSR1)
    if callable(tune_handler):
        tune_handler(signal.SIGUSR1, frame)
    else:  # fit has not installed its handler yet
        raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT and SIGTERM through ``_handler`` (before Ray starts, and again after: Ray's
    core worker replaces the SIGTERM handler with one that aborts the process)."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    interrupts.install(_handler)


def resume_command(sweep_name: str, argv: list[str] | None = None) -> str:
    """The command line that continues this sweep: the same one, with ``sweep.resume=true`` and
    the sweep's name pinned (a default name may contain a timestamp)."""
    argv = list(sys.argv if argv is None else argv)
    args = [a for a in argv[1:] if not a.startswith(("sweep.resume=", "sweep.name="))]
    return shlex.join([argv[0] if argv else "qat-sweep", *args, f"sweep.name={sweep_name}", "sweep.resume=true"])


def program_name(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    return Path(argv[0]).name if argv else "qat-sweep"
