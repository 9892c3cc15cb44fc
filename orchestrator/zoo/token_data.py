"""Generated token-sequence datasets for the ``transformers`` examples (no download, no tokenizer).

- ``majority_tokens``: sequence classification. Each sample is a run of random "filler" tokens
  with ``num_classes`` marker tokens sprinkled in; the label is the marker that occurs most often
  (a unique maximum by construction). A bag-of-tokens count solves it; attention must learn to
  count, so a tiny BERT reaches high accuracy in a few epochs.
- ``markov_text``: language modelling. Sequences from a fixed random order-1 Markov chain over
  ``vocab_size`` tokens, each token with ``branching`` likely successors; the best achievable
  perplexity is about the chain's entropy rate (``~branching``), a uniform guess ``vocab_size``.

Samples have varying lengths (``min_length``..``max_length``) and are dicts of int64 tensors;
``pad_collate`` right-pads a batch and adds ``attention_mask`` (the ``collate_fn`` of the splits).
Token 0 is padding. Every sample is a pure function of ``(seed, split, index)``: a map-style
dataset that computes its samples when asked, so its size costs no memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from .datasets import DataSplits

PAD = 0


def pad_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` to the longest sample (and sequence ``labels`` with -100, not scored);
    ``attention_mask`` marks the real tokens. Scalar ``labels`` are stacked."""
    longest = max(int(s["input_ids"].numel()) for s in samples)
    n = len(samples)
    ids = torch.full((n, longest), PAD, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, s in enumerate(samples):
        k = int(s["input_ids"].numel())
        ids[i, :k] = s["input_ids"]
        mask[i, :k] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in samples[0]:
        labels = [s["labels"] for s in samples]
        if labels[0].dim() == 0:
            batch["labels"] = torch.stack(labels)
        else:
            padded = torch.full((n, longest), -100, dtype=torch.long)
            for i, label in enumerate(labels):
                padded[i, :label.numel()] = label
            batch["labels"] = padded
    return batch


class GeneratedSequences(Dataset):
    """``size`` samples, sample ``i`` made by ``make(generator seeded with (seed, i))``."""

    def __init__(self, size: int, seed: int, make: Callable[[torch.Generator], dict[str, torch.Tensor]]) -> None:
        self.size, self.seed, self.make = size, seed, make

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.make(torch.Generator().manual_seed(self.seed * 1_000_003 + i))


def _splits(make, sizes: tuple[int, int, int], seed: int, model_args: dict) -> DataSplits:
    train, val, test = (GeneratedSequences(n, seed * 3 + k + 1, make) for k, n in enumerate(sizes))
    return DataSplits(train, val, test, collate_fn=pad_collate, model_args=model_args)


def majority_tokens(num_classes: int = 4, vocab_size: int = 64, min_length: int = 12, max_length: int = 32,
                    train_size: int = 4000, val_size: int = 500, test_size: int = 1000, seed: int = 0) -> DataSplits:
    """Which of the ``num_classes`` marker tokens (ids 1..num_classes) occurs most often?"""
    markers = torch.arange(1, num_classes + 1)
    filler_lo = num_classes + 1

    def make(g: torch.Generator) -> dict[str, torch.Tensor]:
        length = int(torch.randint(min_length, max_length + 1, (), generator=g))
        ids = torch.randint(filler_lo, vocab_size, (length,), generator=g)
        counts = torch.randint(0, max(2, length // (2 * num_classes)), (num_classes,), generator=g)
        label = int(torch.randint(0, num_classes, (), generator=g))
        counts[label] = counts.max() + 1  # a unique majority
        tokens = markers.repeat_interleave(counts)[:length]
        where = torch.randperm(length, generator=g)[:tokens.numel()]
        ids[where] = tokens
        return {"input_ids": ids, "labels": torch.tensor(label)}

    return _splits(make, (train_size, val_size, test_size), seed,
                   {"num_classes": num_classes, "vocab_size": vocab_size, "max_length": max_length})


def markov_text(vocab_size: int = 64, branching: int = 3, min_length: int = 16, max_length: int = 32,
                train_size: int = 4000, val_size: int = 500, test_size: int = 1000, seed: int = 0) -> DataSplits:
    """Token sequences of a random order-1 Markov chain (token 0 is padding, never emitted)."""
    g = torch.Generator().manual_seed(seed)
    successors = [(torch.randperm(vocab_size - 1, generator=g)[:branching] + 1).tolist() for _ in range(vocab_size)]
    cumulative = torch.softmax(torch.randn(vocab_size, branching, generator=g), dim=-1).cumsum(-1).tolist()

    def make(gen: torch.Generator) -> dict[str, torch.Tensor]:
        length = int(torch.randint(min_length, max_length + 1, (), generator=gen))
        draws = torch.rand(length, generator=gen).tolist()
        ids = [1 + int(draws[0] * (vocab_size - 1))]
        for u in draws[1:]:  # the successor whose cumulative weight first exceeds u
            row = cumulative[ids[-1]]
            ids.append(successors[ids[-1]][next((k for k, c in enumerate(row) if u < c), branching - 1)])
        t = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": t, "labels": t.clone()}

    return _splits(make, (train_size, val_size, test_size), seed, {"vocab_size": vocab_size, "max_length": max_length})
