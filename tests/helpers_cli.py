"""Running the real command-line programs (qat-train, qat-sweep, qat-compare) in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def cli_env(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["QAT_CACHE_DIR"] = cache_dir
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(program: str, args: list[str], cwd: Path, cache_dir: str, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / program), *args], cwd=cwd, env=cli_env(cache_dir), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{program} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def start_cli(program: str, args: list[str], cwd: Path, cache_dir: str, log: Path) -> subprocess.Popen:
    """Start a program in its own process group (so a test can kill it and its local Ray)."""
    return subprocess.Popen([str(BIN / program), *args], cwd=cwd, env=cli_env(cache_dir), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(log: Path, text: str, timeout: float = 600, proc: subprocess.Popen | None = None,
             poll: float = 0.05) -> None:
    """Wait until ``text`` appears in ``log`` (fail early when ``proc`` ends first)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and text in log.read_text():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(poll)
    raise AssertionError(f"{text!r} never appeared:\n{log.read_text()[-3000:] if log.exists() else ''}")


@contextmanager
def running(program: str, args: list[str], cwd: Path, cache_dir: str, log: Path):
    """``start_cli`` whose process group is killed on the way out if it still runs (a failed
    assertion must not leave a driver and its Ray behind)."""
    proc = start_cli(program, args, cwd, cache_dir, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
