"""Issue 22: every architecture family users bring exports and verifies. Each family's tiny
``transformers`` model (random weights, ``tiny_hf_models.py``) is calibrated W8A8 on 2 batches
of 8, exported, and onnxruntime's QDQ run of the exported files must agree with ``sim.model``
on 32 other inputs: every top-1 for classifiers (whose float model predicts 2+ classes),
>= 40 dB SQNR on the logits of language models (right-padded ``attention_mask``) and
encoder-decoders (``decoder_input_ids``). Every weight of 2+ dims is quantized, and the summary
says what stays float. ``ARCHITECTURES`` is also the row list of ``benchmarks/architectures.py``.

An export takes 10-40 s on the 2-core CI machine (the dynamo exporter), so all but DeiT and OPT
are marked ``slow``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import pytest
import torch
import tiny_hf_models as hf
from quant_checks import (
    OrtAgreement,
    calibrated,
    feed,
    logits_of,
    ort_agreement,
    quantized_param_names,
    two_plus_dim_params,
)


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[], tuple[torch.nn.Module, Callable[[int, int], Any]]]
    lm: bool = False  # logits compared by SQNR (token-level outputs), else top-1
    slow: bool = False

    def __str__(self) -> str:
        return self.name


ARCHITECTURES = [
    Family("llama", hf.make_llama, lm=True, slow=True),
    Family("qwen2", hf.make_qwen2, lm=True, slow=True),
    Family("mistral", hf.make_mistral, lm=True, slow=True),
    Family("phi3", hf.make_phi3, lm=True, slow=True),
    Family("gemma", hf.make_gemma, lm=True, slow=True),
    Family("gemma2", hf.make_gemma2, lm=True, slow=True),
    Family("opt", hf.make_opt, lm=True),
    Family("falcon", hf.make_falcon, lm=True, slow=True),
    Family("gpt_neox", hf.make_gpt_neox, lm=True, slow=True),
    Family("t5", hf.make_t5, lm=True, slow=True),
    Family("bart", hf.make_bart, lm=True, slow=True),
    Family("whisper_seq2seq", hf.make_whisper_seq2seq, lm=True, slow=True),
    Family("clip", hf.make_clip, slow=True),
    Family("siglip", hf.make_siglip, slow=True),
    Family("deit", hf.make_deit),
    Family("swin", hf.make_swin, slow=True),
    Family("convnextv2", hf.make_convnextv2, slow=True),
    Family("segformer", hf.make_segformer, lm=True, slow=True),  # per-pixel logits: compared by SQNR
]


class ExportRun:
    def __init__(self, family: Family) -> None:
        self.family = family
        self.model, self.batch = family.make()
        self.calibration = [self.batch(8, seed) for seed in range(2)]
        self.ort_inputs = self.batch(32, 500)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"export-{family.name}-")

    @cached_property
    def sim(self):
        return calibrated(self.model, self.calibration)

    @cached_property
    def export(self) -> dict[str, str]:
        return self.sim.export(self._tmp.name, self.family.name)

    @cached_property
    def ort(self) -> OrtAgreement:
        return ort_agreement(self.sim, self.export, self.ort_inputs)


@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.slow) if f.slow else f
                                        for f in ARCHITECTURES], ids=str)
def run(request):
    return ExportRun(request.param)


def test_export_agrees_with_onnxruntime(run):
    agreement = run.ort
    if run.family.lm:
        assert agreement.sqnr >= 40.0, f"{run.family}: ORT vs sim {agreement}"
    else:
        with torch.no_grad():
            classes = logits_of(feed(run.model.eval(), run.ort_inputs)).argmax(-1).unique().numel()
        assert classes >= 2, f"{run.family}: the float model predicts one class for every input"
        assert agreement.top1 == 1.0, f"{run.family}: ORT vs sim {agreement}"


def test_every_weight_used_is_quantized(run):
    """Every parameter of 2+ dims that the forward pass uses is quantized (CLIP/SigLIP image
    classifiers hold no text tower; the others use all of theirs)."""
    expected = two_plus_dim_params(run.model)
    got = quantized_param_names(run.sim)
    assert got == expected, f"float: {sorted(expected - got)}; unexpected: {sorted(got - expected)}"


def test_no_quantizer_on_integer_or_mask_tensors(run):
    """What the sim quantizes is float activation data: every activation encoding's tensor in the
    exported graph is float (onnxruntime refuses QuantizeLinear on int64), and no encoding spans
    an additive mask's huge range."""
    import onnx

    from orchestrator.quant.encodings_io import read_encodings

    paths = run.export
    model = onnx.shape_inference.infer_shapes(onnx.load(paths["onnx"]))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input,
                                                            *model.graph.output]}
    acts, _ = read_encodings(paths["encodings"])
    not_float = {n: types[n] for n in acts if n in types and types[n] != onnx.TensorProto.FLOAT}
    assert not not_float, not_float
    huge = {n: float(e.max - e.min) for n, e in acts.items() if float(e.max - e.min) > 1e4}
    assert not huge, huge
