"""Issue 9 acceptance on plain PyTorch models users write themselves (``tiny_torch_models.py``):
a torchvision-style ResNet (BasicBlock with ``out += identity``, ``ReLU(inplace=True)``, depthwise
separable convs), LSTM and GRU classifiers, ``nn.MultiheadAttention``, Conv1d/Conv3d/ConvTranspose,
and a tied-embedding LM: built, calibrated, checked against FP32, exported, verified in onnxruntime
and trained 20 range-learning steps (``acceptance.py``)."""

from __future__ import annotations

import pytest
from acceptance import (
    AcceptanceRun,
    Case,
    check_builds_like_the_original,
    check_every_weight_quantized,
    check_export_and_onnxruntime,
    check_range_learning,
    check_w8a8_sqnr,
)
from tiny_torch_models import make_convs, make_gru, make_lstm, make_mha, make_resnet, make_tied_lm

CASES = [
    Case("resnet", make_resnet),
    Case("lstm", make_lstm),
    Case("gru", make_gru),
    Case("mha", make_mha),
    Case("convs", make_convs),
    Case("tied_lm", make_tied_lm, lm=True),
]


@pytest.fixture(scope="module", params=CASES, ids=str)
def run(request):
    return AcceptanceRun(request.param)


def test_builds_with_its_call_convention(run):
    check_builds_like_the_original(run)


def test_every_weight_is_quantized(run):
    check_every_weight_quantized(run)


def test_w8a8_output_sqnr(run):
    check_w8a8_sqnr(run)


def test_export_agrees_with_onnxruntime(run):
    check_export_and_onnxruntime(run)


def test_range_learning_20_steps(run):
    check_range_learning(run)
