"""One intra-op thread for the quant tests: their models are tiny, and on a shared 2-core machine
OpenMP's second thread is often descheduled, so every op waits for it at the barrier (GPT-2's 20
range-learning steps: 13 s with 2 threads on a loaded machine, 0.4 s with 1). Restored after each
module, so other test directories keep their setting."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
