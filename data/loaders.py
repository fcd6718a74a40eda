"""Deterministic, rank-sharded, resumable batch iteration over memory-mapped rows.

Batches are *global*: ``batch_size`` counts rows across all ranks, and rank ``r`` takes the
``r``-th slice of every global batch. A run on N ranks therefore consumes exactly the same
global batches, in the same order, as a run on 1 rank; that is what makes 1-vs-N parity and
resuming a checkpoint on another world size possible. The order depends only on the seed and
the epoch, and the position within an epoch is part of the state, so a job killed mid-epoch
resumes at the next unseen batch.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import numpy as np
import pytorch_lightning as pl

T = TypeVar("T")


class _EpochSampler:
    """Receives ``set_epoch`` from Lightning (its loops call it on ``loader.sampler``)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class GlobalBatches(Generic[T]):
    """Iterable of this rank's slice of each global batch of ``rows``.

    ``make_batch(rows)`` turns an array of row ids into a batch object. The last, short global
    batch is kept for evaluation (``drop_last=False``) and split as evenly as possible; if it has
    fewer rows than ranks it is merged into the previous batch so that every rank gets at least one
    row in every step (the sharded model runs collectives in its forward pass, so all ranks must
    step together). Training drops the short batch by default so every step has the same size.
    """

    def __init__(
        self,
        rows: np.ndarray,
        batch_size: int,
        make_batch: Callable[[np.ndarray], T],
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} is the global batch and must be divisible by the world size "
                f"{world_size}"
            )
        if len(rows) < world_size:
            raise ValueError(f"{len(rows)} rows cannot feed {world_size} ranks")
        self.rows = np.asarray(rows)
        self.batch_size = batch_size
        self.make_batch = make_batch
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        # Lightning duck-types DataLoaders: it calls loader.sampler.set_epoch() at every epoch start
        # and reads batch_sampler when checking whether evaluation data is shuffled.
        self.sampler = _EpochSampler()
        self.batch_sampler = None
        self._consumed = 0
        self._resume_from = 0

    # -- layout ---------------------------------------------------------------------------------
    def _bounds(self) -> list[tuple[int, int]]:
        n = len(self.rows)
        full = n // self.batch_size
        bounds = [(i * self.batch_size, (i + 1) * self.batch_size) for i in range(full)]
        rest = n - full * self.batch_size
        if rest and not self.drop_last:
            if rest >= self.world_size or not bounds:
                bounds.append((full * self.batch_size, n))
            else:
                bounds[-1] = (bounds[-1][0], n)
        return bounds

    def __len__(self) -> int:
        return len(self._bounds())

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        return self.rows[rng.permutation(len(self.rows))]

    def local_rows(self, global_rows: np.ndarray) -> np.ndarray:
        return np.array_split(global_rows, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[T]:
        return self._generate(None)

    def iter_from(self, start: int) -> Iterator[T]:
        """This epoch's batches from batch ``start`` on (a training pipeline restarts there)."""
        return self._generate(start)

    def _generate(self, start: int | None) -> Iterator[T]:
        # The order is computed on the first next(), after Lightning has called set_epoch().
        order = self._order(self.sampler.epoch)
        resume, self._resume_from = self._resume_from, 0
        start = resume if start is None else start
        for i, (lo, hi) in enumerate(self._bounds()):
            if i < start:
                continue
            yield self.make_batch(self.local_rows(order[lo:hi]))

    # -- resumable state (Lightning's _Stateful protocol) ----------------------------------------
    def mark_consumed(self, batches: int) -> None:
        """Record how many batches of the current epoch have been trained on.

        Lightning prefetches one batch ahead, so the count of batches *yielded* overstates the
        position; the training module reports the true count from ``on_train_batch_start``.
        """
        self._consumed = batches

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "consumed": self._consumed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rows") != len(self.rows):
            raise ValueError(
                f"checkpointed loader had {state.get('rows')} rows, this one has {len(self.rows)}: "
                "resuming on different data would not continue the same run"
            )
        self.sampler.epoch = int(state["epoch"])
        self._resume_from = int(state["consumed"])
        self._consumed = self._resume_from


class ShardedDataModule(pl.LightningDataModule):
    """A LightningDataModule whose loaders are :class:`GlobalBatches`, built once per split.

    Subclasses implement :meth:`make_loader`; the rank and world size come from the trainer the
    module is attached to (rank 0 of 1 without one, e.g. for export and tests).
    """

    def __init__(self) -> None:
        super().__init__()
        self._loaders: dict[str, GlobalBatches[Any]] = {}

    def rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    @abstractmethod
    def make_loader(self, split: str, rank: int, world_size: int) -> GlobalBatches[Any]: ...

    def loader(self, split: str) -> GlobalBatches[Any]:
        if split not in self._loaders:
            self._loaders[split] = self.make_loader(split, *self.rank_world())
        return self._loaders[split]

    def train_dataloader(self) -> GlobalBatches[Any]:
        return self.loader("train")

    def val_dataloader(self) -> GlobalBatches[Any] | list[Any]:
        return self.loader("val")

    def test_dataloader(self) -> GlobalBatches[Any]:
        return self.loader("test")

    def predict_dataloader(self) -> GlobalBatches[Any]:
        return self.loader("test")
