"""How a trial's config is named wherever it is shown: run names, MLflow tags, tables, sweep
trial names. One rule per label, so a console line, a tag and a plot never disagree."""

from __future__ import annotations

from .config import TrialConfig

MODES = {False: ("static", "static", "static"), True: ("range_learning", "range learning", "RL")}


def bits_label(cfg: TrialConfig) -> str:
    """``w4a4``: weight and activation bit widths (the ``qat.bits`` tag, trial names)."""
    return f"w{cfg.quant.param_bw}a{cfg.quant.output_bw}"


def mode_label(cfg: TrialConfig) -> str:
    """``static`` | ``range_learning`` (the ``qat.mode`` tag, run names)."""
    return MODES[bool(cfg.qat.range_learning)][0]


def mode_text(cfg: TrialConfig) -> str:
    """``static`` | ``range learning`` (tables read by people)."""
    return MODES[bool(cfg.qat.range_learning)][1]


def mode_short(cfg: TrialConfig) -> str:
    """``static`` | ``RL`` (sweep trial names, which must stay short)."""
    return MODES[bool(cfg.qat.range_learning)][2]
