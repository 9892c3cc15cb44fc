"""A trial's DataLoaders: training shards, exact evaluation shards, calibration batches.

- **Training**: a map-style dataset is shuffled and sharded by ``DistributedSampler`` (seeded,
  reshuffled every epoch; it repeats a few samples so every rank gets as many). An iterable
  dataset is read in its own order, rank ``r`` of ``w`` (and, inside it, loader worker ``k`` of
  ``K``) keeping every ``w*K``-th sample; ranks may then run out at different steps (the train
  loop joins them). Such a dataset must yield the whole stream in every reader (not split itself
  by ``get_worker_info()``): each reader iterates all of it and keeps its share.
- **Evaluation** is exact: rank ``r`` reads samples ``r, r+w, r+2w, ...`` with nothing padded or
  dropped, so the all-reduced sums count every sample exactly once.
- **Calibration** batches come from the training split, the same on every rank: a seeded
  permutation of a map-style dataset, or the first samples of an iterable one.

Loaders use ``data.loader_workers`` worker processes and pinned memory on CUDA.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, default_collate
from torch.utils.data import get_worker_info


def is_iterable(dataset: Dataset) -> bool:
    return isinstance(dataset, IterableDataset)


class ShardedIterable(IterableDataset):
    """Samples ``i`` of an iterable ``dataset`` with ``i % (world * K) == rank * K + k`` in loader
    worker ``k`` of ``K`` (``K = 1`` without workers): each sample kept by exactly one reader, each
    reader iterating the whole stream (the dataset must not split itself by worker)."""

    def __init__(self, dataset: IterableDataset, rank: int, world: int) -> None:
        self.dataset, self.rank, self.world = dataset, rank, world

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return itertools.islice(iter(self.dataset), self.rank * workers + worker, None, self.world * workers)


class StridedSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a map-style dataset: an exact, unpadded shard."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader(dataset: Dataset, batch_size: int, collate_fn, workers: int, device: torch.device,
            keep_workers: bool = True, **kw) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=keep_workers and workers > 0, **kw)


def train_loader(dataset: Dataset, batch_size: int, rank: int, world: int, seed: int, device: torch.device,
                 collate_fn: Callable | None = None, workers: int = 0) -> tuple[DataLoader, Sampler | None]:
    """The training loader of rank ``rank`` (``batch_size`` per rank) and its ``DistributedSampler``
    (None for an iterable dataset), whose ``set_epoch`` reshuffles."""
    # Persistent workers keep the dataset as it was when they started: not for one whose own
    # set_epoch reshuffles it (its loader starts fresh workers every epoch).
    keep = not callable(getattr(dataset, "set_epoch", None))
    if is_iterable(dataset):
        return _loader(ShardedIterable(dataset, rank, world), batch_size, collate_fn, workers, device, keep), None
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return _loader(dataset, batch_size, collate_fn, workers, device, keep, sampler=sampler), sampler


class FirstBatches:
    """The first ``count`` batches of each pass over ``loader`` (``len``: at most ``count``); a
    shuffling sampler draws a different subset every epoch."""

    def __init__(self, loader: DataLoader, count: int) -> None:
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return min(len(self.loader), self.count)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.count)


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world: int, device: torch.device,
                collate_fn: Callable | None = None, workers: int = 0) -> DataLoader:
    """Rank ``rank``'s exact shard of ``dataset``, in order."""
    if is_iterable(dataset):
        return _loader(ShardedIterable(dataset, rank, world), batch_size, collate_fn, workers, device)
    sampler = StridedSampler(len(dataset), rank, world)
    return _loader(dataset, batch_size, collate_fn, workers, device, sampler=sampler)


def calibration_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                        collate_fn: Callable | None = None) -> list[Any]:
    """Up to ``count`` batches of ``batch_size`` training samples, identical on every rank: a
    ``seed``-ed permutation of a map-style dataset, the first samples of an iterable one."""
    collate = collate_fn or default_collate
    wanted = batch_size * count
    if is_iterable(dataset):
        samples = list(itertools.islice(iter(dataset), wanted))
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:wanted]
        samples = [dataset[int(i)] for i in order]
    if not samples:
        raise ValueError("the training split is empty: calibration needs at least one sample")
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def set_epoch(dataset: Dataset, sampler: Sampler | None, epoch: int) -> None:
    """Reshuffle for ``epoch``: the sampler's, and the dataset's own ``set_epoch`` if it has one
    (e.g. a shuffling iterable dataset)."""
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    if callable(getattr(dataset, "set_epoch", None)):
        dataset.set_epoch(epoch)
