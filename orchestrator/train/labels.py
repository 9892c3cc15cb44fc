"""How a trial's config is named wherever it is shown: run names, MLflow tags, tables, sweep
trial names. One rule per label, so a console line, a tag and a plot never disagree."""

from __future__ import annotations

from .config import TrialConfig

MODES = {False: ("static", "static", "static"), True: ("range_learning", "range learning", "RL")}


FLOAT_SHORT = {"float8_e4m3fn": "fp8", "float8_e5m2": "fp8e5m2", "float4_e2m1": "fp4", "float16": "fp16",
               "bfloat16": "bf16"}


def _format(fmt: str, bits: int, block: int = 0) -> str:
    """``4``, ``4g32`` (int, blocks of 32), ``fp8`` (a float format by its short name)."""
    if fmt != "int":
        return FLOAT_SHORT.get(fmt, fmt)
    return f"{bits}g{block}" if block else str(bits)


def bits_label(cfg: TrialConfig) -> str:
    """``w4a4``: weight and activation formats (the ``qat.bits`` tag, trial names): ``w4g32a8``
    (int4 weights in blocks of 32, int8 activations), ``w4g128`` (weight-only), ``wfp8afp8``."""
    q = cfg.quant
    weights = f"w{_format(q.param_format, q.param_bw, q.param_block_size)}"
    return weights + (f"a{_format(q.output_format, q.output_bw)}" if q.quantize_activations else "")


def mode_label(cfg: TrialConfig) -> str:
    """``static`` | ``range_learning`` (the ``qat.mode`` tag, run names)."""
    return MODES[bool(cfg.qat.range_learning)][0]


def mode_text(cfg: TrialConfig) -> str:
    """``static`` | ``range learning`` (tables read by people)."""
    return MODES[bool(cfg.qat.range_learning)][1]


def mode_short(cfg: TrialConfig) -> str:
    """``static`` | ``RL`` (sweep trial names, which must stay short)."""
    return MODES[bool(cfg.qat.range_learning)][2]
