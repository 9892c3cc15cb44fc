"""Running the real command-line programs (qat-train, qat-sweep, qat-compare) in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
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
