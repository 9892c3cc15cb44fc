"""Shared fixtures: real digits data and a really trained (pretrained) digits CNN."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import train_epochs

from orchestrator.zoo.datasets import digits
from orchestrator.zoo.models import DigitsCNN


@pytest.fixture(scope="session")
def digits_data():
    return digits()


@pytest.fixture(scope="session")
def _pretrained_digits_cnn(digits_data):
    torch.manual_seed(0)
    model = DigitsCNN()
    train_epochs(model, digits_data.train, epochs=15, lr=3e-3)
    model.eval()
    return model


@pytest.fixture
def pretrained(_pretrained_digits_cnn):
    """A fresh copy of the trained FP32 digits CNN (tests may modify it)."""
    return copy.deepcopy(_pretrained_digits_cnn)


@pytest.fixture(scope="session")
def calibration_batches(digits_data):
    x = digits_data.train.tensors[0]
    return [x[i:i + 64] for i in range(0, 512, 64)]


@pytest.fixture(scope="session")
def baseline_cache(tmp_path_factory):
    """One FP32-baseline cache for the whole session (each baseline is trained once)."""
    return str(tmp_path_factory.mktemp("pretrained-cache"))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster (4 logical CPUs on this 2-core machine), shared by the session."""
    import ray

    from orchestrator.train.ray_launcher import ensure_ray

    ensure_ray(None, num_cpus=4)
    yield ray
    ray.shutdown()
