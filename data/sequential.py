"""Next-item batches from a prepared dataset's ``sequences`` table, leave-one-out (SASRec protocol).

Each row of ``sequences`` is one user's time-ordered items. Per user with at least 3 items the last
item is the test target, the second-to-last the validation target and the rest is training data;
users with fewer than 3 items are training data only (the rule of :func:`data.splits.leave_one_out`,
so the same users are held out as in the ``interactions`` split of a leave-one-out dataset).

* Training: one row per user with at least 2 training items. ``inputs`` are the training items but
  the last, ``targets`` the training items but the first (so every position has a next item to
  predict), both cut to the most recent ``max_len`` and left-padded with 0.
* Every batch is as wide as its longest row (at most ``max_len``), not ``max_len``: the encoders
  count positions from the most recent item and ignore left padding, so the columns that are
  padding in every row would only cost work (on the Video catalog, with a median history of 3, a
  64-row batch is on average 41 columns wide, not 50).
* Validation: the training items -> the validation item. Test: training + validation items -> the
  test item. Each carries ``eval_negatives`` items drawn uniformly from the items the user never
  interacted with (with replacement, as the paper's code), for the sampled protocol.

Training negatives (by loss): ``per_position`` draws one item per target position uniformly from
the items not in the user's training items (the paper's BCE negatives); ``per_sequence`` draws
``num_negatives`` items per row from the proposal ``q`` (uniform, or proportional to the training
count + 1) for sampled softmax, which corrects with ``log q`` and so must sample ``q`` exactly (no
exclusion). Every draw comes from a generator seeded by ``(seed, stream, epoch, row)``, so a
row's negatives do not depend on the world size or on which rank serves it; evaluation negatives
are fixed (no epoch) so every validation sees the same candidates.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.streamable import Pipelineable

from data.loaders import GlobalBatches, ShardedDataModule
from data.shards import SPLIT_CODES, PreparedDataset

PAD = 0
NEGATIVE_KINDS = ("none", "per_position", "per_sequence")
SAMPLERS = ("uniform", "popularity")
_TRAIN_STREAM = 0x5E0
_EVAL_STREAM = 0x5E1


@dataclass
class SequenceBatch(Pipelineable):
    """Rows of next-item data; all tensors int64.

    ``inputs [B, L]`` left-padded item indices (0 = padding), ``L`` the longest row of the batch
    (at most ``max_len``). ``targets``: training ``[B, L]``, the next item at every position (0
    where there is none); evaluation ``[B]``, the held-out item.
    ``negatives``: training ``[B, L]`` (per position), ``[B, N]`` (per sequence) or ``[B, 0]``;
    evaluation ``[B, C]`` sampled-protocol candidates. ``rows`` are the ``sequences`` rows.
    """

    rows: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor

    def _map(self, fn: Any) -> SequenceBatch:
        return SequenceBatch(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device, non_blocking: bool = False) -> SequenceBatch:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> SequenceBatch:
        return self._map(lambda t: t.pin_memory())

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class NegativeSampling:
    kind: str = "none"  # none | per_position | per_sequence
    num: int = 1  # per_sequence: negatives per row
    sampler: str = "uniform"  # per_sequence proposal: uniform | popularity

    def __post_init__(self) -> None:
        if self.kind not in NEGATIVE_KINDS:
            raise ValueError(f"negative sampling kind {self.kind!r}: choose from {NEGATIVE_KINDS}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"model.negative_sampler {self.sampler!r}: choose from {SAMPLERS}")
        if self.kind == "per_sequence" and self.num <= 0:
            raise ValueError(f"model.num_negatives must be > 0, got {self.num}")


def left_padded(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """``[rows, length]`` int64: the last ``length`` of each ``values[starts[i]:ends[i]]``, right-aligned."""
    n = len(starts)
    take = np.minimum(ends - starts, length).astype(np.int64)
    out = np.zeros((n, length), dtype=np.int64)
    total = int(take.sum())
    if total == 0:
        return out
    row = np.repeat(np.arange(n), take)
    within = np.arange(total) - np.repeat(np.cumsum(take) - take, take)  # 0 .. take[i] - 1
    out[row, length - np.repeat(take, take) + within] = values[np.repeat(ends - take, take) + within]
    return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def sample_excluding(rng: np.random.Generator, num_items: int, size: int, exclude: np.ndarray) -> np.ndarray:
    """``size`` uniform draws from ``1 .. num_items - 1`` that are not in ``exclude`` (with replacement)."""
    out = rng.integers(1, num_items, size=size)
    bad = np.isin(out, exclude)
    rounds = 0
    while bad.any():
        rounds += 1
        if rounds == 100 and np.isin(np.arange(1, num_items), exclude).all():
            raise ValueError("cannot sample a negative: the user interacted with every item")
        out[bad] = rng.integers(1, num_items, size=int(bad.sum()))
        bad = np.isin(out, exclude)
    return out


class SequenceSplits:
    """Leave-one-out over the ``sequences`` table, and the batch builders of each split."""

    def __init__(self, ds: PreparedDataset, max_len: int, seed: int = 0, eval_negatives: int = 100,
                 negatives: NegativeSampling | None = None) -> None:  # fmt: skip
        if max_len <= 0:
            raise ValueError(f"model.max_len must be > 0, got {max_len}")
        if eval_negatives < 0:
            raise ValueError(f"model.eval_negatives must be >= 0, got {eval_negatives}")
        info = ds.info("sequences", "items")
        if info.vocab is None:
            raise ValueError(f"{ds.path}: sequences.items has no vocabulary (vocab) in meta.json")
        self.num_items = int(info.vocab)
        self.max_len = max_len
        self.seed = seed
        self.eval_negatives = eval_negatives
        self.negatives = negatives or NegativeSampling()
        seqs = ds.jagged("sequences", "items")
        self.values = np.asarray(seqs.values, dtype=np.int64)
        self.offsets = np.asarray(seqs.offsets, dtype=np.int64)
        lengths = np.diff(self.offsets)
        held_out = lengths >= 3
        self.train_len = np.where(held_out, lengths - 2, lengths)
        self.rows = {
            "train": np.flatnonzero(self.train_len >= 2),
            "val": np.flatnonzero(held_out),
            "test": np.flatnonzero(held_out),
        }
        if len(self.rows["train"]) == 0:
            raise ValueError(f"{ds.path}: no user has 2 training items; nothing to train a sequence model on")
        if self.values.size and (self.values.min() < 1 or self.values.max() >= self.num_items):
            raise ValueError(
                f"{ds.path}: sequences.items has indices outside 1..{self.num_items - 1} "
                "(0 is padding and cannot be a history item or a target)"
            )
        # item counts over training items only, so held-out targets do not leak into the proposal
        train_mask = np.arange(len(self.values)) < np.repeat(self.offsets[:-1] + self.train_len, lengths)
        self.train_counts = np.bincount(self.values[train_mask], minlength=self.num_items).astype(np.int64)
        self.train_counts[PAD] = 0
        weights = (
            self.train_counts[1:] + 1.0
            if self.negatives.sampler == "popularity"
            else np.ones(self.num_items - 1)
        )
        self.proposal = np.concatenate([[0.0], weights / weights.sum()])
        self._proposal_cum = np.cumsum(self.proposal[1:])

    def _width(self, lengths: np.ndarray) -> int:
        """Columns of a batch whose rows have ``lengths`` items: the longest, at most ``max_len``."""
        return int(min(self.max_len, max(1, int(lengths.max(initial=0)))))

    # -- training ---------------------------------------------------------------------------------
    def train_batch(self, rows: np.ndarray, epoch: int) -> SequenceBatch:
        starts = self.offsets[rows]
        ends = starts + self.train_len[rows]
        width = self._width(ends - 1 - starts)
        inputs = left_padded(self.values, starts, ends - 1, width)
        targets = left_padded(self.values, starts + 1, ends, width)
        kind = self.negatives.kind
        if kind == "per_position":
            negatives = np.zeros_like(targets)
            for i, (row, lo, hi) in enumerate(zip(rows, starts, ends, strict=True)):
                where = targets[i] != PAD
                rng = _rng(self.seed, _TRAIN_STREAM, epoch, row)
                seen = self.values[lo:hi]
                negatives[i, where] = sample_excluding(rng, self.num_items, int(where.sum()), seen)
        elif kind == "per_sequence":
            negatives = np.zeros((len(rows), self.negatives.num), dtype=np.int64)
            total = self._proposal_cum[-1]
            for i, row in enumerate(rows):
                u = _rng(self.seed, _TRAIN_STREAM, epoch, row).random(self.negatives.num) * total
                negatives[i] = np.searchsorted(self._proposal_cum, u, side="right") + 1
            np.clip(negatives, 1, self.num_items - 1, out=negatives)
        else:
            negatives = np.zeros((len(rows), 0), dtype=np.int64)
        return _batch(rows, inputs, targets, negatives)

    # -- evaluation -------------------------------------------------------------------------------
    def eval_batch(self, rows: np.ndarray, split: str) -> SequenceBatch:
        """Validation (``split="val"``) or test rows: history -> the held-out item."""
        held = 2 if split == "val" else 1
        starts = self.offsets[rows]
        ends = self.offsets[np.asarray(rows) + 1]
        inputs = left_padded(self.values, starts, ends - held, self._width(ends - held - starts))
        targets = self.values[ends - held]
        negatives = np.zeros((len(rows), self.eval_negatives), dtype=np.int64)
        for i, (row, lo, hi) in enumerate(zip(rows, starts, ends, strict=True)):
            rng = _rng(self.seed, _EVAL_STREAM, SPLIT_CODES[split], row)
            negatives[i] = sample_excluding(rng, self.num_items, self.eval_negatives, self.values[lo:hi])
        return _batch(rows, inputs, targets, negatives)


def _batch(rows: np.ndarray, inputs: np.ndarray, targets: np.ndarray, negatives: np.ndarray) -> SequenceBatch:
    return SequenceBatch(
        rows=torch.from_numpy(np.asarray(rows, dtype=np.int64)),
        inputs=torch.from_numpy(inputs),
        targets=torch.from_numpy(np.asarray(targets, dtype=np.int64)),
        negatives=torch.from_numpy(np.asarray(negatives, dtype=np.int64)),
    )


class SequentialDataModule(ShardedDataModule):
    """Train/val/test :class:`SequenceBatch` es of a prepared dataset, sharded across ranks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        seed: int = 0,
        negatives: NegativeSampling | None = None,
        eval_negatives: int = 100,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.dataset = PreparedDataset(self.path)
        if not self.dataset.has_table("sequences"):
            raise ValueError(f"{self.path}: no sequences table; prepare it with `funnel data prepare`")
        self.splits = SequenceSplits(self.dataset, max_len, seed, eval_negatives, negatives)

    @property
    def num_items(self) -> int:
        return self.splits.num_items

    def make_loader(self, split: str, rank: int, world_size: int) -> GlobalBatches[SequenceBatch]:
        train = split == "train"
        loader: GlobalBatches[SequenceBatch] = GlobalBatches(
            self.splits.rows[split],
            self.batch_size if train else self.eval_batch_size,
            lambda rows: self.splits.eval_batch(rows, split),
            rank=rank,
            world_size=world_size,
            shuffle=train,
            seed=self.seed,
            drop_last=train,
        )
        if train:
            # negatives change every epoch; the loader knows the epoch Lightning is in
            loader.make_batch = lambda rows: self.splits.train_batch(rows, loader.sampler.epoch)
        return loader
