"""Where built-in data and FP32 baselines are cached: ``$QAT_CACHE_DIR`` or ``~/.cache/qat-orchestrator``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("QAT_CACHE_DIR", Path.home() / ".cache" / "qat-orchestrator")).expanduser()
