"""Stop signals: SIGINT (Ctrl-C) and SIGTERM (what ``timeout``, SLURM and Kubernetes send) end a
program the same way.

The first signal is remembered and raised as ``KeyboardInterrupt`` where the main thread is, so
``finally`` blocks run (temporary export directories are removed, MLflow runs are marked
KILLED) and the program exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM).
Ray's core worker replaces the SIGTERM handler of a process that starts Ray (with one that aborts
it), so programs call ``reinstall()`` after Ray starts.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class StopState:
    signum: int | None = None  # the first stop signal received
    in_fit: bool = False  # a sweep's Tuner.fit is running (its SIGUSR1 handler is installed)
    handler: Callable | None = None  # the handler this process installed, if any

    @property
    def stopping(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name


STATE = StopState()


def interrupt(signum: int, frame) -> None:
    """Remember the first stop signal and raise ``KeyboardInterrupt`` here."""
    STATE.signum = STATE.signum or signum
    raise KeyboardInterrupt


def install(handler: Callable = interrupt) -> None:
    """Route SIGINT and SIGTERM through ``handler`` (from the main thread)."""
    STATE.handler = handler
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def reinstall() -> None:
    """Put this process's handler back (after Ray replaced it); nothing if none was installed."""
    if STATE.handler is not None:
        import threading

        if threading.current_thread() is threading.main_thread():
            install(STATE.handler)
