"""Issue 9's acceptance flow for one model, computed lazily and once per model (module fixtures).

``AcceptanceRun(case)``: the float model and its batches; ``sim`` (built from the raw model with
the first calibration batch as dummy input, calibrated on 4 batches of 16); W8A8 SQNR on 2
held-out batches of 16; ``export`` (the three files) and onnxruntime's agreement on 32 other
inputs; 20 range-learning steps on one batch of 8 (Adam, lr 1e-3 for weights and, in their own
group, encodings).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch

from quant_checks import (
    OrtAgreement,
    RangeLearningRun,
    calibrated,
    classification_loss,
    feed,
    logits_of,
    next_token_loss,
    ort_agreement,
    range_learning_steps,
    sqnr_db,
)


@dataclass
class Case:
    name: str
    make: Callable[[], tuple[torch.nn.Module, Callable[[int, int], Any]]]
    lm: bool = False  # language model: next-token loss, logits compared by SQNR (else top-1)
    config: dict[str, Any] = field(default_factory=dict)  # QuantConfig fields of the W8A8 sim
    # the float model amplifies any perturbation (MobileNetV2 at random init: see
    # check_mobilenet_v2_is_chaotic_not_misquantized), so a last-bit difference between torch's and
    # onnxruntime's conv summation order can flip one input's top-1: one flip of 32 is allowed
    chaotic: bool = False

    def __str__(self) -> str:
        return self.name


@dataclass
class Sqnr:
    plain: float  # dB, the logits as they are
    centered: float  # dB, the logits minus their mean over the inputs: the part that depends on the input
    input_dependence: float  # fraction of the float logits' power that depends on the input


class AcceptanceRun:
    def __init__(self, case: Case) -> None:
        self.case = case
        self.model, self.batch = case.make()
        self.calibration = [self.batch(16, seed) for seed in range(4)]
        self.held_out = [self.batch(16, 100 + seed) for seed in range(2)]
        self.ort_inputs = self.batch(32, 500)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"accept-{case.name}-")

    @cached_property
    def sim(self):
        return calibrated(self.model, self.calibration, **self.case.config)

    @cached_property
    def sqnr(self) -> Sqnr:
        return measure_sqnr(self.model, self.sim, self.held_out)

    @cached_property
    def export(self) -> dict[str, str]:
        return self.sim.export(self._tmp.name, self.case.name)

    @cached_property
    def ort(self) -> OrtAgreement:
        return ort_agreement(self.sim, self.export, self.ort_inputs)

    @cached_property
    def float_top1_classes(self) -> int:
        """How many classes the float model predicts over the ORT inputs (1: agreement is trivial)."""
        with torch.no_grad():
            return int(logits_of(feed(self.model.eval(), self.ort_inputs)).argmax(-1).unique().numel())

    @cached_property
    def range_learning(self) -> RangeLearningRun:
        sim = calibrated(self.model, self.calibration, range_learning=True)
        train = [self.batch(8, 200)]  # one batch, 20 steps: the loss must go down
        if self.case.lm:
            ids = train[0]["input_ids"] if isinstance(train[0], dict) else train[0]
            return range_learning_steps(sim, train, next_token_loss, [ids])
        labels = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(7))
        return range_learning_steps(sim, train, classification_loss, [labels])


@torch.no_grad()
def measure_sqnr(model: torch.nn.Module, sim, batches: list) -> Sqnr:
    model.eval()
    sim.model.eval()
    ref = torch.cat([logits_of(feed(model, b)) for b in batches])
    out = torch.cat([logits_of(feed(sim.model, b)) for b in batches])
    ref_c, out_c = ref - ref.mean(0, keepdim=True), out - out.mean(0, keepdim=True)
    return Sqnr(sqnr_db(ref, out), sqnr_db(ref_c, out_c), float(ref_c.square().sum() / ref.square().sum()))


# ---------------------------------------------------------------------------- the checks
def check_builds_like_the_original(run: AcceptanceRun) -> None:
    """``sim.model`` is an instance of the model's class, called the same way, returning the same structure."""
    model, sim = run.model, run.sim
    assert isinstance(sim.model, type(model)), type(sim.model).__mro__
    batch = run.held_out[0]
    with torch.no_grad():
        ref, out = feed(model, batch), feed(sim.model, batch)
    assert type(out) is type(ref), (type(out), type(ref))
    assert logits_of(out).shape == logits_of(ref).shape
    if hasattr(ref, "keys"):
        assert list(out.keys()) == list(ref.keys())


def float_section(sim) -> str:
    text = sim.summary()
    return text.split("Stays float:", 1)[1] if "Stays float:" in text else ""


def check_every_weight_quantized(run: AcceptanceRun, documented_float: dict[str, str] | None = None) -> None:
    """The quantized parameters are exactly the model's parameters of 2+ dims (every name of a tied
    one), but the ``documented_float`` ones, which the summary must list with their reason."""
    from quant_checks import quantized_param_names, two_plus_dim_params

    documented_float = documented_float or {}
    expected = two_plus_dim_params(run.model) - set(documented_float)
    got = quantized_param_names(run.sim)
    assert got == expected, f"float: {sorted(expected - got)}; unexpected: {sorted(got - expected)}"
    floats = float_section(run.sim)
    for name in expected:
        assert f"  {name}:" not in floats, f"{name} is quantized but the summary lists it as float:\n{floats}"
    for name, why in documented_float.items():
        assert f"  {name}: {why}" in floats, floats


def check_w8a8_sqnr(run: AcceptanceRun, threshold: float = 20.0) -> None:
    """Output SQNR >= 20 dB, on the logits and on their input-dependent part (the logits of a
    random model may be mostly a constant, which alone would make the first number easy)."""
    s = run.sqnr
    assert s.plain >= threshold and s.centered >= threshold, (
        f"{run.case}: W8A8 SQNR {s.plain:.1f} dB, input-dependent part {s.centered:.1f} dB "
        f"({s.input_dependence:.0%} of the float logits' power depends on the input)")


def check_export_and_onnxruntime(run: AcceptanceRun) -> None:
    """Export writes the three files; onnxruntime on them agrees with ``sim.model``: every top-1
    of 32 inputs (classification, the float model predicting 2+ classes), or >= 40 dB (LM logits)."""
    import os

    assert all(os.path.isfile(p) for p in run.export.values()), run.export
    agreement = run.ort
    if run.case.lm:
        assert agreement.sqnr >= 40.0, f"{run.case}: ORT vs sim {agreement}"
    else:
        assert run.float_top1_classes >= 2, f"{run.case}: the float model predicts one class for every input"
        assert agreement.top1 >= (31 / 32 if run.case.chaotic else 1.0), f"{run.case}: ORT vs sim {agreement}"


def check_range_learning(run: AcceptanceRun) -> None:
    """20 steps, Adam at lr 1e-3 (weights and encodings): loss finite and decreasing, no learned
    scale at its floor, no collapse warning."""
    import math

    r = run.range_learning
    losses = r.losses
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] and sum(losses[-5:]) < sum(losses[:5]), f"{run.case}: loss {losses}"
    assert r.collapsed == [], f"{run.case}: collapsed {r.collapsed}"
    assert r.warnings == [], f"{run.case}: {r.warnings}"
