"""The task-agnostic pieces: batches of any form, exact evaluation over uneven shards (two real gloo
processes), iterable datasets, seeded calibration batches, tasks' metrics, and distillation."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from orchestrator.tasks import Classification, LanguageModeling, batch_size, head, to_device
from orchestrator.train.data import calibration_batches, eval_loader, train_loader
from orchestrator.train.loops import Distillation, LoopContext, evaluate, train_epoch

N = 101  # odd: two ranks get 51 and 50 samples


def data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


class Stream(IterableDataset):
    """An iterable dataset (no ``len``): the samples of ``data()`` in order."""

    def __init__(self, n: int = N) -> None:
        self.base = data(n)

    def __iter__(self):
        return iter(self.base[i] for i in range(len(self.base)))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        task, device = Classification(top_k=2), torch.device("cpu")
        m = model().eval()
        for name, dataset in (("map", data()), ("iterable", Stream())):
            loader = eval_loader(dataset, 8, rank, world, device)
            seen = sum(len(b[1]) for b in loader)
            out[f"{name}-{rank}"] = (evaluate(m, loader, task, device), seen)
    finally:
        dist.destroy_process_group()


def test_evaluation_over_uneven_shards_of_two_gloo_workers_equals_one_process():
    task, device = Classification(top_k=2), torch.device("cpu")
    single = evaluate(model().eval(), eval_loader(data(), 8, 0, 1, device), task, device)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_shard_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        out = dict(out)
    for name in ("map", "iterable"):
        (m0, seen0), (m1, seen1) = out[f"{name}-0"], out[f"{name}-1"]
        assert (seen0, seen1) == (51, 50), name  # every sample once: nothing padded, nothing dropped
        assert m0 == m1 == single, name  # exactly the single-process metrics, on every rank


def test_iterable_training_data_is_sharded_across_ranks_and_loader_workers():
    seen = []
    for rank in range(2):
        loader, sampler = train_loader(Stream(), 4, rank, 2, seed=0, device=torch.device("cpu"), workers=2)
        assert sampler is None
        seen += [float(x[0, 0]) for b in loader for x in b[0].split(1)]
    assert sorted(seen) == sorted(float(x[0]) for x, _ in data())  # each sample read by exactly one reader


def test_calibration_batches_are_seeded_and_the_same_for_every_call():
    a = calibration_batches(data(), 16, 3, seed=7)
    b = calibration_batches(data(), 16, 3, seed=7)
    c = calibration_batches(data(), 16, 3, seed=8)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert [len(x[0]) for x in calibration_batches(Stream(), 40, 5, seed=0)] == [40, 40, 21]  # iterable: 101 in all


def test_batches_of_any_form():
    batch = {"input_ids": torch.ones(5, 3, dtype=torch.long), "extra": (torch.zeros(5), [torch.ones(5, 2)])}
    assert batch_size(batch) == 5
    first = head(batch, 2)
    assert first["input_ids"].shape == (2, 3) and first["extra"][1][0].shape == (2, 2)
    assert to_device(batch, torch.device("cpu"))["extra"][0].shape == (5,)


def test_classification_reads_tuples_and_dicts():
    task = Classification(top_k=2)
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0], [1.0, 3.0, 2.0]])
    labels = torch.tensor([0, 0, 2])
    sums = task.metric_sums(logits, labels)
    assert task.compute_metrics(sums) == {"acc": pytest.approx(100 / 3), "top2": pytest.approx(200 / 3)}
    assert task.inputs({"pixel_values": 1, "labels": 2}) == {"pixel_values": 1}
    assert task.inputs((1, 2, 3)) == (1, 2) and task.targets((1, 2, 3)) == 3
    with pytest.raises(KeyError, match="'labels'"):
        task.targets({"pixel_values": 1})


def test_language_modelling_scores_next_tokens_and_skips_padding():
    task = LanguageModeling()
    ids = torch.tensor([[1, 2, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    targets = task.targets(batch)
    assert targets.tolist() == [[1, 2, 3, -100]]
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = 10.0  # predicts 2 after 1 and 3 after 2
    sums = task.metric_sums(logits, targets)
    assert sums["tokens"] == 2.0  # positions 1 and 2; the padded position 3 is not scored
    expected = F.cross_entropy(logits[0, :2], torch.tensor([2, 3]))
    metrics = task.compute_metrics(sums)
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    assert task.prediction_rows(logits, targets).shape == (2, 5)


def test_distillation_adds_the_tempered_kl_to_the_weighted_task_loss():
    task, device, temperature = Classification(), torch.device("cpu"), 3.0
    dataset = data(64)
    student, teacher = model(), nn.Linear(6, 4)
    x, y = dataset.tensors
    s_logits, t_logits = student(x), teacher(x).detach()
    by_hand = (0.3 * F.cross_entropy(s_logits, y) + 0.7 * temperature ** 2 * (
        F.softmax(t_logits / temperature, -1) * (F.log_softmax(t_logits / temperature, -1)
                                                 - F.log_softmax(s_logits / temperature, -1))).sum(-1).mean())
    by_hand.backward()
    expected = {n: p.grad.clone() for n, p in student.named_parameters()}
    assert float(task.distill_loss(s_logits, t_logits, y, temperature)) == pytest.approx(
        float((by_hand - 0.3 * F.cross_entropy(s_logits, y)) / 0.7), rel=1e-5)

    student.zero_grad()
    loader, _ = train_loader(dataset, 64, 0, 1, seed=0, device=device)
    params = list(student.parameters())
    optimizer = torch.optim.SGD(params, lr=0.0)  # no step: the gradient of one batch is compared
    result = train_epoch(student, loader, optimizer, LoopContext(
        task, device, params, distill=Distillation(teacher, temperature, weight=0.7, task_weight=0.3)))
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)
    assert result.loss_sum / result.samples == pytest.approx(float(F.cross_entropy(s_logits, y)), rel=1e-5)
    assert result.distill_sum > 0

    same = train_epoch(student, loader, optimizer, LoopContext(
        task, device, params, distill=Distillation(student, temperature, weight=1.0, task_weight=0.0)))
    assert same.distill_sum == pytest.approx(0.0, abs=1e-6)  # KL of a model with itself
