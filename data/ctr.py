"""CTR (ranking) batches from a prepared dataset's ``ctr`` table."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.loaders import GlobalBatches, ShardedDataModule
from data.shards import Jagged, PreparedDataset


@dataclass(frozen=True)
class SparseFeature:
    name: str
    vocab: int  # embedding rows, OOV bucket included
    multi_valued: bool = False


@dataclass(frozen=True)
class CTRSchema:
    """The model-facing description of a ``ctr`` table: which columns are features."""

    sparse: tuple[SparseFeature, ...]
    dense: tuple[str, ...]

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @classmethod
    def from_dataset(cls, ds: PreparedDataset, features: list[str] | None = None) -> CTRSchema:
        """Sparse features are the categorical columns (those with a vocabulary); ``dense`` is 2-D."""
        table = ds.tables["ctr"]
        sparse = [
            SparseFeature(name, int(info.vocab), info.jagged)
            for name, info in table.columns.items()
            if info.vocab is not None
        ]
        if features is not None:
            known = {f.name: f for f in sparse}
            unknown = [f for f in features if f not in known]
            if unknown:
                raise ValueError(
                    f"unknown feature(s) {unknown} in the config; "
                    f"{ds.path} has sparse features {sorted(known)}"
                )
            sparse = [known[f] for f in features]
        dense: tuple[str, ...] = ()
        if "dense" in table.columns:
            info = table.columns["dense"]
            dense = tuple(info.names or [f"dense_{i}" for i in range(info.width or 0)])
        return cls(sparse=tuple(sparse), dense=dense)


class CTRBatchBuilder:
    """Gathers rows of the memory-mapped ``ctr`` table into a TorchRec ``Batch``."""

    def __init__(self, ds: PreparedDataset, schema: CTRSchema) -> None:
        self.schema = schema
        self.columns: dict[str, np.ndarray | Jagged] = {
            f.name: ds.jagged("ctr", f.name) if f.multi_valued else ds.column("ctr", f.name)
            for f in schema.sparse
        }
        self.dense = ds.column("ctr", "dense") if schema.dense else None
        self.labels = ds.column("ctr", "label")

    def __call__(self, rows: np.ndarray) -> Batch:
        n = len(rows)
        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for f in self.schema.sparse:
            col = self.columns[f.name]
            if isinstance(col, Jagged):
                v, ln = col.take(rows)
            else:
                v, ln = np.asarray(col[rows]), np.ones(n, dtype=np.int64)
            values.append(v.astype(np.int64, copy=False))
            lengths.append(ln.astype(np.int32, copy=False))
        kjt = KeyedJaggedTensor(
            keys=self.schema.sparse_names,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        dense = (
            torch.from_numpy(np.asarray(self.dense[rows], dtype=np.float32))
            if self.dense is not None
            else torch.zeros(n, 0)
        )
        labels = torch.from_numpy(np.asarray(self.labels[rows], dtype=np.float32))
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


class CTRDataModule(ShardedDataModule):
    """Train/val/test batches of a prepared dataset's ``ctr`` table, sharded across ranks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 1024,
        eval_batch_size: int = 4096,
        seed: int = 0,
        features: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.dataset = PreparedDataset(self.path)
        self.schema = CTRSchema.from_dataset(self.dataset, features)
        self._builder = CTRBatchBuilder(self.dataset, self.schema)

    def make_loader(self, split: str, rank: int, world_size: int) -> GlobalBatches[Batch]:
        train = split == "train"
        return GlobalBatches(
            self.dataset.split_rows("ctr", split),
            self.batch_size if train else self.eval_batch_size,
            self._builder,
            rank=rank,
            world_size=world_size,
            shuffle=train,
            seed=self.seed,
            drop_last=train,
        )
