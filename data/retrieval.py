"""Retrieval (two-tower) batches from a prepared dataset's ``interactions``, ``users``, ``items`` and
``sequences`` tables.

Three kinds of batch, each a TorchRec ``Pipelineable`` carrying one ``KeyedJaggedTensor`` with the
keys of both towers (a sharded ``EmbeddingBagCollection`` needs every key in every input; keys
that do not apply to a row are empty bags):

* :class:`RetrievalBatch` (training): ``B`` interactions of the train split, i.e. ``B`` queries
  (user id, user side features, the user's recent items) with their positive items, then ``N``
  items drawn uniformly from the catalog (mixed negatives). Rows ``0..B-1`` carry a query and its
  positive, rows ``B..B+N-1`` only a sampled item.
* :class:`UserBatch` (evaluation): users with their held-out target items and the items they had
  already seen (excluded from the ranking).
* :class:`ItemBatch`: catalog items, to compute every item embedding.
* :class:`CatalogBatch` (training with ``train_on="users"``, the multinomial loss): users, each
  with the bag of all their training items, then this rank's slice of the catalog.

History (``history_mode="recent"``, the default): the items of the user strictly before the
interaction, newest ``history_length`` kept, taken from ``sequences`` and restricted to the splits a
stage may see (:data:`VISIBLE`), so no held-out item ever becomes a feature. For splits that are not
temporal (a random hold-out per user, such as the LCF/UltraGCN files) "before" has no meaning at test
time; ``history_mode="others"`` then uses the user's *other* visible items (never the interaction's
own item), at most ``history_length`` of them drawn at random, the behaviour aggregation of
YouTube DNN / SimpleX. ``history_dropout`` then drops each training bag item with that probability
(never an evaluation one). Evaluation queries may take longer bags (``eval_history_length``). The
``sequences`` rows must line up with the ``interactions`` rows (what ``funnel data prepare`` and the
synthetic generator write); that is checked on load. Index 0 of any field is unknown/padding and
is never sent: an unknown id is an empty bag, which pools to zero.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data.ctr import SparseFeature
from data.loaders import GlobalBatches, ShardedDataModule
from data.shards import SPLIT_CODES, Jagged, PreparedDataset
from data.splits import DEFAULT_FRACTIONS, make_split

HISTORY = "history"  # KJT key of the recent-items bag
SPLITS = ("dataset", "loo", "temporal", "random")
HISTORY_MODES = ("recent", "others")
TRAIN_ON = ("interactions", "users")  # a training row is an interaction, or a user against the catalog
# Splits whose interactions a stage may use as history features and must exclude from its ranking:
# validation sees training only; test also sees validation (leave-one-out: the item before the test one).
VISIBLE = {"train": ("train",), "val": ("train",), "test": ("train", "val")}
_NEGATIVES_STREAM = 0x7E6
_HISTORY_STREAM = 0x415
_VALIDATION_STREAM = 0x7A1
_DROPOUT_STREAM = 0xD20

BatchT = TypeVar("BatchT", bound="_TensorBatch")


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices ``starts[i] .. starts[i] + lengths[i]`` of every row, concatenated."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


def hold_out_validation(codes: np.ndarray, users: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Move a random ``fraction`` of each user's training rows to the validation split.

    For splits published without a validation set (the LCF/UltraGCN files: train and test only), so
    that hyper-parameters can be chosen without looking at the test split. Each user with at least
    3 training rows gives ``max(1, round(fraction * n))`` of them; lighter users keep all theirs.
    The draw depends only on the seed and the rows, so every rank and every re-run agree.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"model.val_fraction must be in (0, 1), got {fraction}")
    codes = np.array(codes, dtype=np.uint8, copy=True)
    if (codes == SPLIT_CODES["val"]).any():
        raise ValueError("model.val_fraction: the split already has validation rows")
    train = np.flatnonzero(codes == SPLIT_CODES["train"])
    owner = np.asarray(users, dtype=np.int64)[train]
    key = np.random.default_rng([seed, _VALIDATION_STREAM]).random(len(train))
    order = np.lexsort((key, owner))  # by user, then a random key: each user's rows shuffled
    sorted_owner = owner[order]
    starts = np.flatnonzero(np.r_[True, sorted_owner[1:] != sorted_owner[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    take = np.where(counts >= 3, np.maximum(1, np.rint(fraction * counts)), 0).astype(np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    codes[train[order[rank < np.repeat(take, counts)]]] = SPLIT_CODES["val"]
    return codes


def _drop_unknown(values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove index 0 (unknown/padding) from a bag column, fixing the lengths."""
    values = np.asarray(values, dtype=np.int64)
    keep = values > 0
    if keep.all():
        return values, np.asarray(lengths, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return values[keep], np.bincount(rows[keep], minlength=len(lengths)).astype(np.int64)


def _tensor_fields(batch: _TensorBatch) -> dict[str, Any]:
    values = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return {k: v for k, v in values.items() if isinstance(v, torch.Tensor | KeyedJaggedTensor)}


@dataclass
class _TensorBatch(Pipelineable):
    """``Pipelineable`` over every tensor / KJT field (like ``torchrec.datasets.utils.Batch``)."""

    def to(self: BatchT, device: torch.device, non_blocking: bool = False) -> BatchT:
        moved = {k: v.to(device=device, non_blocking=non_blocking) for k, v in _tensor_fields(self).items()}
        return dataclasses.replace(self, **moved)

    def record_stream(self, stream: torch.Stream) -> None:
        for value in _tensor_fields(self).values():
            value.record_stream(stream)

    def pin_memory(self: BatchT) -> BatchT:
        return dataclasses.replace(self, **{k: v.pin_memory() for k, v in _tensor_fields(self).items()})


@dataclass
class RetrievalBatch(_TensorBatch):
    """Training rows: ``num_queries`` (user, positive item) pairs, then sampled items."""

    features: KeyedJaggedTensor  # stride num_queries + num sampled items
    user: torch.Tensor  # [rows] user index of each row, 0 for the sampled items
    item: torch.Tensor  # [rows] candidate item index: the positives, then the sampled items
    item_prob: torch.Tensor  # [rows] float: the candidate's share of training interactions
    num_queries: int

    @property
    def batch_size(self) -> int:
        return self.num_queries


@dataclass
class _UsersWithTargets(_TensorBatch):
    """Query rows of users, with each user's target items (jagged)."""

    features: KeyedJaggedTensor
    user: torch.Tensor  # [U]
    target_values: torch.Tensor
    target_offsets: torch.Tensor  # [U + 1]

    @property
    def num_queries(self) -> int:
        return int(self.user.shape[0])

    @property
    def batch_size(self) -> int:
        return self.num_queries

    def target_mask(self, num_columns: int) -> torch.Tensor:
        return _jagged_mask(self.target_values, self.target_offsets, num_columns)


@dataclass
class UserBatch(_UsersWithTargets):
    """Evaluation users: query features, target items and already-seen items (both jagged)."""

    seen_values: torch.Tensor
    seen_offsets: torch.Tensor

    def seen_mask(self, num_columns: int) -> torch.Tensor:
        return _jagged_mask(self.seen_values, self.seen_offsets, num_columns)


@dataclass
class CatalogBatch(_UsersWithTargets):
    """Training users against the whole catalog (``train_on="users"``: the multinomial loss).

    Rows ``0..num_queries-1`` are users, each with the bag of all their training items (input
    dropout applied); the last rows are this rank's slice of the catalog (``item``, 0 = padding so
    that every rank's slice has the same size). The targets are each user's training items.
    """

    item: torch.Tensor  # [C] this rank's catalog slice, 0-padded


def _offsets(lengths: np.ndarray) -> torch.Tensor:
    """int64 offsets ``[0, l0, l0 + l1, ...]`` of jagged rows of ``lengths``."""
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def _jagged_mask(values: torch.Tensor, offsets: torch.Tensor, num_columns: int) -> torch.Tensor:
    rows = offsets.numel() - 1
    mask = torch.zeros(rows, num_columns, dtype=torch.bool, device=values.device)
    row_of = torch.repeat_interleave(torch.arange(rows, device=values.device), offsets.diff())
    mask[row_of, values] = True
    return mask


@dataclass
class ItemBatch(_TensorBatch):
    features: KeyedJaggedTensor
    item: torch.Tensor  # [S]

    @property
    def num_items(self) -> int:
        return int(self.item.shape[0])

    @property
    def batch_size(self) -> int:
        return self.num_items


@dataclass(frozen=True)
class RetrievalSchema:
    """Which dataset fields feed which tower."""

    user_features: tuple[SparseFeature, ...]
    item_features: tuple[SparseFeature, ...]
    num_users: int  # real users: indices 1..num_users
    num_items: int
    history_length: int

    @property
    def query_keys(self) -> list[str]:
        return [f.name for f in self.user_features] + ([HISTORY] if self.history_length else [])

    @property
    def item_keys(self) -> list[str]:
        return [f.name for f in self.item_features]

    @property
    def keys(self) -> list[str]:
        return self.query_keys + self.item_keys

    @classmethod
    def from_dataset(
        cls,
        ds: PreparedDataset,
        user_features: Sequence[str] | None = None,
        item_features: Sequence[str] | None = None,
        history_length: int = 20,
    ) -> RetrievalSchema:
        """Default features: the id plus every categorical column of the ``users``/``items`` table."""
        if history_length < 0:
            raise ValueError(f"model.history_length must be >= 0, got {history_length}")
        user_vocab = int(ds.info("interactions", "user").vocab or 0)
        item_vocab = int(ds.info("interactions", "item").vocab or 0)
        if user_vocab < 2 or item_vocab < 2:
            raise ValueError(f"{ds.path}: interactions.user/item have no vocabulary; not a prepared dataset?")
        chosen = []
        for entity, table, id_vocab, names in (
            ("user", "users", user_vocab, user_features),
            ("item", "items", item_vocab, item_features),
        ):
            known = {entity: SparseFeature(entity, id_vocab)}
            if ds.has_table(table):
                for name, info in ds.iter_columns(table):
                    if info.vocab is not None:
                        known[name] = SparseFeature(name, int(info.vocab), info.jagged)
            if names is None:
                picked = list(known.values())
            else:
                unknown = [n for n in names if n not in known]
                if unknown:
                    raise ValueError(
                        f"model.{entity}_features: unknown feature(s) {unknown}; "
                        f"{ds.path} has {sorted(known)}"
                    )
                picked = [known[n] for n in names]
            chosen.append(tuple(picked))
        if "item" not in [f.name for f in chosen[1]]:
            raise ValueError(
                "model.item_features must include 'item' (the item id is what the index returns)"
            )
        clash = {f.name for f in chosen[0]} & {f.name for f in chosen[1]} | (
            {HISTORY} & {f.name for f in chosen[0] + chosen[1]}
        )
        if clash:
            raise ValueError(
                f"feature name(s) {sorted(clash)} used twice (user, item and {HISTORY!r} features)"
            )
        return cls(chosen[0], chosen[1], user_vocab - 1, item_vocab - 1, history_length)


class _SideColumns:
    """Per-entity feature lookups: the id itself, or a column of the ``users``/``items`` table."""

    def __init__(
        self, ds: PreparedDataset, table: str, entity: str, features: Sequence[SparseFeature]
    ) -> None:
        self.entity = entity
        self.columns: dict[str, np.ndarray | Jagged | None] = {}
        for f in features:
            if f.name == entity:
                self.columns[f.name] = None
            elif f.multi_valued:
                self.columns[f.name] = ds.jagged(table, f.name)
            else:
                self.columns[f.name] = ds.column(table, f.name)

    def bags(self, name: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        col = self.columns[name]
        if isinstance(col, Jagged):
            values, lengths = col.take(index)
        else:
            values = index if col is None else np.asarray(col[index])
            lengths = np.ones(len(index), dtype=np.int64)
        return _drop_unknown(values, lengths)


class _History:
    """The history bag of interaction rows, from the rows a stage may see.

    ``visible`` marks those rows; ``compact`` is their items in row order and ``cum[j]`` how many
    visible rows precede row ``j``, so a user's visible items are one slice of ``compact``.
    """

    def __init__(
        self,
        items: np.ndarray,
        seq_offsets: np.ndarray,
        visible: np.ndarray,
        length: int,
        mode: str,
        seed: int,
        dropout: float = 0.0,
    ) -> None:
        # mode and dropout arrive checked: RetrievalDataModule, the only caller, validates them
        self.visible = visible
        self.compact = np.asarray(items, dtype=np.int64)[visible]
        self.cum = np.concatenate([[0], np.cumsum(visible, dtype=np.int64)])
        self.seq_offsets = seq_offsets
        self.length = length
        self.mode = mode
        self.seed = seed
        self.dropout = dropout

    def of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(values, lengths)`` of the bags of interaction ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        seq = np.searchsorted(self.seq_offsets, rows, side="right") - 1
        first = self.cum[self.seq_offsets[seq]]
        if self.mode == "recent":
            hi = self.cum[rows]
            lo = np.maximum(first, hi - self.length)
            return self._drop(rows, *_drop_unknown(self.compact[_ranges(lo, hi - lo)], hi - lo))
        # others: the user's visible items except this row's own
        own = np.where(self.visible[rows], self.cum[rows], -1)
        return self._sample(seq, own, rows)

    def of_sequences(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(values, lengths)`` of bags of *all* the visible items of sequences (users) ``seq``.

        The input of a denoising autoencoder's user (Mult-DAE): the items the loss then predicts are
        in the bag too, and ``dropout`` is what keeps the model from copying its input.
        """
        seq = np.asarray(seq, dtype=np.int64)
        # keyed apart from interaction rows (whose keys are row numbers, far below 2**40)
        return self._sample(seq, np.full(len(seq), -1, dtype=np.int64), seq + (1 << 40))

    def _sample(self, seq: np.ndarray, own: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The visible items of sequences ``seq`` except position ``own`` (-1: none), sampled (with
        replacement: an unbiased bag mean) when there are more than ``length``; the draws keyed by
        ``key``, so reproducible."""
        first = self.cum[self.seq_offsets[seq]]
        others = self.cum[self.seq_offsets[seq + 1]] - first - (own >= 0)
        small = others <= self.length
        lengths = np.where(small, others, self.length)
        rng = np.random.default_rng([self.seed, _HISTORY_STREAM, zlib.crc32(key.tobytes())])
        k = _ranges(np.zeros(len(seq), dtype=np.int64), lengths)  # 0..length-1 per row
        big = np.repeat(~small, lengths)
        k[big] = (rng.random(int(big.sum())) * np.repeat(others, lengths)[big]).astype(np.int64)
        pos = np.repeat(first, lengths) + k
        owner = np.repeat(own, lengths)
        pos += (owner >= 0) & (pos >= owner)  # skip the row's own item
        return self._drop(key, *_drop_unknown(self.compact[pos], lengths))

    def _drop(
        self, rows: np.ndarray, values: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each bag item dropped with probability ``dropout``, one kept per non-empty bag.

        Input dropout of denoising autoencoders (Mult-DAE): without it a user with fewer items than
        ``length`` sees the same bag (minus the target) in every one of their training rows.
        """
        if not self.dropout or not len(values):
            return values, lengths
        rng = np.random.default_rng([self.seed, _DROPOUT_STREAM, zlib.crc32(rows.tobytes())])
        keep = rng.random(len(values)) >= self.dropout
        starts = np.cumsum(lengths) - lengths
        nonempty = lengths > 0
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        kept = np.bincount(row_of[keep], minlength=len(lengths))
        keep[starts[nonempty & (kept == 0)]] = True  # an empty bag would say "no history"
        return values[keep], np.bincount(row_of[keep], minlength=len(lengths)).astype(np.int64)


@dataclass
class EvalUsers:
    """The users of one evaluation split, with jagged targets / seen items (sorted item indices)."""

    users: np.ndarray  # [U]
    first_rows: np.ndarray  # [U] the user's first interaction row in the split (history cut-off)
    targets: Jagged  # held-out items not seen before
    seen: Jagged  # items of the visible splits (excluded from the ranking)


class RetrievalDataModule(ShardedDataModule):
    """Two-tower batches of a prepared dataset, sharded across ranks with :class:`GlobalBatches`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 1024,
        eval_batch_size: int = 4096,
        seed: int = 0,
        *,
        user_features: Sequence[str] | None = None,
        item_features: Sequence[str] | None = None,
        history_length: int = 20,
        history_mode: str = "recent",
        num_negatives: int = 0,
        split: str = "dataset",
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        val_fraction: float = 0.0,
        eval_history_length: int | None = None,
        history_dropout: float = 0.0,
        train_on: str = "interactions",
    ) -> None:
        super().__init__()
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on {train_on!r}: choose one of {TRAIN_ON}")
        self.train_on = train_on
        if num_negatives < 0:
            raise ValueError(f"model.loss.num_negatives must be >= 0, got {num_negatives}")
        if eval_history_length is None:
            eval_history_length = history_length
        if eval_history_length < 0 or (eval_history_length and not history_length):
            raise ValueError(
                f"model.eval.history_length {eval_history_length}: must be >= 0, and 0 without a history "
                f"feature (model.history_length {history_length})"
            )
        # The query bags of evaluation (and of the exported encoder's inputs) may be longer than the
        # training ones: with history_mode=others a training bag is a random sample of the user's
        # items (cheap, and a regulariser), while a query is best served by the mean of all of them.
        self.eval_history_length = eval_history_length
        self.path = Path(path)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_negatives = num_negatives
        if history_mode not in HISTORY_MODES:
            raise ValueError(f"model.history_mode {history_mode!r}: choose one of {HISTORY_MODES}")
        self.history_mode = history_mode
        if not 0.0 <= history_dropout < 1.0:
            raise ValueError(f"model.history_dropout must be in [0, 1), got {history_dropout}")
        self.history_dropout = history_dropout
        self.dataset = ds = PreparedDataset(self.path)
        self.schema = RetrievalSchema.from_dataset(ds, user_features, item_features, history_length)
        self.inter_user = np.asarray(ds.column("interactions", "user"), dtype=np.int64)
        self.inter_item = np.asarray(ds.column("interactions", "item"), dtype=np.int64)
        self.seq_offsets, self.seq_user = self._check_sequences()
        self.codes = self._split_codes(split, fractions)
        # what the split codes were made from (recorded with exports next to the dataset fingerprint)
        self.split_spec: dict[str, Any] = {"split": split, "val_fraction": val_fraction, "seed": seed}
        if split in ("temporal", "random"):
            self.split_spec["fractions"] = [float(f) for f in fractions]
        if val_fraction:
            self.codes = hold_out_validation(self.codes, self.inter_user, val_fraction, seed)
        train_items = self.inter_item[self.codes == SPLIT_CODES["train"]]
        if len(train_items) == 0:
            raise ValueError(f"{self.path}: the {split!r} split leaves no training interactions")
        # popularity = training counts: the logQ correction's sampling frequencies and the baseline
        self.item_counts = np.bincount(train_items, minlength=self.schema.num_items + 1).astype(np.int64)
        self.item_prob = (self.item_counts / self.item_counts.sum()).astype(np.float32)
        self._users = _SideColumns(ds, "users", "user", self.schema.user_features)
        self._items = _SideColumns(ds, "items", "item", self.schema.item_features)
        self._histories: dict[tuple[tuple[str, ...], int, float], _History] = {}
        self._eval_users: dict[str, EvalUsers | None] = {}

    # -- dataset layout -------------------------------------------------------------------------
    def _check_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, user)`` of the ``sequences`` rows, checked to line up with the interactions."""
        seq = self.dataset.jagged("sequences", "items")
        seq_user = np.asarray(self.dataset.column("sequences", "user"), dtype=np.int64)
        offsets = np.asarray(seq.offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        aligned = (
            len(seq.values) == len(self.inter_item)
            and np.array_equal(np.repeat(seq_user, lengths), self.inter_user)
            and np.array_equal(np.asarray(seq.values), self.inter_item)
        )
        if not aligned:
            raise ValueError(
                f"{self.path}: sequences.items does not line up with the interactions rows (user, then time "
                "order); re-prepare the dataset with `funnel data prepare`"
            )
        return offsets, seq_user

    def _split_codes(self, split: str, fractions: Sequence[float]) -> np.ndarray:
        if split == "dataset":
            return np.asarray(self.dataset.column("interactions", "split"), dtype=np.uint8)
        if split not in SPLITS:
            raise ValueError(f"model.split {split!r}: choose one of {SPLITS}")
        if "timestamp" in self.dataset.tables["interactions"].columns:
            ts = np.asarray(self.dataset.column("interactions", "timestamp"))
        elif split == "temporal":
            raise ValueError(f"model.split temporal: {self.path} has no interactions.timestamp")
        else:
            ts = np.arange(len(self.inter_user))  # rows are already in time order per user
        return make_split(split, self.inter_user, ts, fractions=fractions, seed=self.seed)

    def _history(self, stage: str) -> _History:
        visible = VISIBLE[stage]
        length = self.schema.history_length if stage == "train" else self.eval_history_length
        dropout = self.history_dropout if stage == "train" else 0.0  # queries are never thinned
        key = (visible, length, dropout)
        if key not in self._histories:
            mask = np.isin(self.codes, [SPLIT_CODES[s] for s in visible])
            self._histories[key] = _History(
                self.inter_item, self.seq_offsets, mask, length, self.history_mode, self.seed, dropout
            )
        return self._histories[key]

    def eval_users(self, stage: str) -> EvalUsers | None:
        """Users with at least one ``stage`` target not seen in the visible splits (None if none)."""
        if stage not in self._eval_users:
            self._eval_users[stage] = self._make_eval_users(stage)
        return self._eval_users[stage]

    def _make_eval_users(self, stage: str) -> EvalUsers | None:
        width = self.schema.num_items + 1
        rows = np.flatnonzero(self.codes == SPLIT_CODES[stage])
        if len(rows) == 0:
            return None
        users, first = np.unique(self.inter_user[rows], return_index=True)
        first_rows = rows[first]  # rows of a user are in time order: the first is the earliest
        visible = np.isin(self.codes, [SPLIT_CODES[s] for s in VISIBLE[stage]])
        seen_keys = np.unique(self.inter_user[visible] * width + self.inter_item[visible])
        target_keys = np.unique(self.inter_user[rows] * width + self.inter_item[rows])
        # a re-consumed item was seen, so it is excluded from the ranking and cannot be a target
        target_keys = np.setdiff1d(target_keys, seen_keys, assume_unique=True)
        keep = np.isin(users, target_keys // width)
        users, first_rows = users[keep], first_rows[keep]
        if len(users) == 0:
            return None

        def jagged(keys: np.ndarray) -> Jagged:
            owner = keys // width
            lo = np.searchsorted(owner, users, side="left")
            hi = np.searchsorted(owner, users, side="right")
            values = (keys % width)[_ranges(lo, hi - lo)]
            return Jagged(values, np.concatenate([[0], np.cumsum(hi - lo)]))

        return EvalUsers(users, first_rows, jagged(target_keys), jagged(seen_keys))

    # -- batches --------------------------------------------------------------------------------
    def _kjt(self, bags: dict[str, tuple[np.ndarray, np.ndarray]], stride: int) -> KeyedJaggedTensor:
        empty = (np.zeros(0, dtype=np.int64), np.zeros(stride, dtype=np.int64))
        keys = self.schema.keys
        parts = [bags.get(k, empty) for k in keys]
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.concatenate([v for v, _ in parts]).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate([ln for _, ln in parts]).astype(np.int32)),
        )

    def _query_bags(
        self, users: np.ndarray, history: tuple[np.ndarray, np.ndarray], pad: int = 0
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """User-tower bags of ``users`` followed by ``pad`` rows without a query."""
        bags = {f.name: self._users.bags(f.name, users) for f in self.schema.user_features}
        if self.schema.history_length:
            bags[HISTORY] = history
        tail = np.zeros(pad, dtype=np.int64)
        return {k: (v, np.concatenate([ln, tail])) for k, (v, ln) in bags.items()}

    def _item_bags(self, items: np.ndarray, lead: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Item-tower bags of ``items`` after ``lead`` rows without an item."""
        head = np.zeros(lead, dtype=np.int64)
        out = {}
        for f in self.schema.item_features:
            v, ln = self._items.bags(f.name, items)
            out[f.name] = (v, np.concatenate([head, ln]))
        return out

    def negatives_per_rank(self, world_size: int) -> int:
        if self.num_negatives % world_size:
            raise ValueError(
                f"model.loss.num_negatives {self.num_negatives} must be divisible by the world size "
                f"{world_size}"
            )
        return self.num_negatives // world_size

    def train_batch(self, rows: np.ndarray, num_negatives: int = 0) -> RetrievalBatch:
        """Interaction ``rows`` of the train split plus ``num_negatives`` uniformly drawn items.

        The draw is keyed by the rows themselves, so the same batch (a re-run, a resumed job)
        always gets the same sampled items.
        """
        rows = np.asarray(rows, dtype=np.int64)
        users, items = self.inter_user[rows], self.inter_item[rows]
        rng = np.random.default_rng([self.seed, _NEGATIVES_STREAM, zlib.crc32(rows.tobytes())])
        negatives = rng.integers(1, self.schema.num_items + 1, size=num_negatives, dtype=np.int64)
        candidates = np.concatenate([items, negatives])
        bags = self._query_bags(users, self._history("train").of(rows), pad=num_negatives)
        bags.update(self._item_bags(candidates))
        return RetrievalBatch(
            features=self._kjt(bags, len(candidates)),
            user=torch.from_numpy(np.concatenate([users, np.zeros(num_negatives, dtype=np.int64)])),
            item=torch.from_numpy(candidates),
            item_prob=torch.from_numpy(self.item_prob[candidates]),
            num_queries=len(rows),
        )

    def training_sequences(self) -> np.ndarray:
        """Sequences (users) with at least one training interaction: the rows of ``train_on="users"``."""
        hist = self._history("train")
        counts = hist.cum[self.seq_offsets[1:]] - hist.cum[self.seq_offsets[:-1]]
        return np.flatnonzero(counts > 0)

    def catalog_slice(self, rank: int, world_size: int) -> np.ndarray:
        """Rank ``rank``'s share of items ``1..num_items``, 0-padded so that all ranks' are equal."""
        per = -(-self.schema.num_items // world_size)
        items = np.arange(1 + rank * per, 1 + min((rank + 1) * per, self.schema.num_items), dtype=np.int64)
        return np.concatenate([items, np.zeros(per - len(items), dtype=np.int64)])

    def catalog_batch(self, seq: np.ndarray, items: np.ndarray) -> CatalogBatch:
        """Users of sequences ``seq`` (bags of all their training items) and catalog ``items``."""
        seq = np.asarray(seq, dtype=np.int64)
        hist = self._history("train")
        users = self.seq_user[seq]
        bags = self._query_bags(users, hist.of_sequences(seq), pad=len(items))
        bags.update(self._item_bags(items, lead=len(seq)))
        lo, hi = hist.cum[self.seq_offsets[seq]], hist.cum[self.seq_offsets[seq + 1]]
        return CatalogBatch(
            features=self._kjt(bags, len(seq) + len(items)),
            user=torch.from_numpy(users),
            item=torch.from_numpy(items),
            target_values=torch.from_numpy(hist.compact[_ranges(lo, hi - lo)]),
            target_offsets=_offsets(hi - lo),
        )

    def user_batch(self, stage: str, index: np.ndarray) -> UserBatch:
        """Rows ``index`` of :meth:`eval_users` of ``stage``."""
        ev = self.eval_users(stage)
        assert ev is not None
        users = ev.users[index]
        bags = self._query_bags(users, self._history(stage).of(ev.first_rows[index]))
        tv, tl = ev.targets.take(index)
        sv, sl = ev.seen.take(index)
        return UserBatch(
            features=self._kjt(bags, len(users)),
            user=torch.from_numpy(users.astype(np.int64)),
            target_values=torch.from_numpy(tv.astype(np.int64)),
            target_offsets=_offsets(tl),
            seen_values=torch.from_numpy(sv.astype(np.int64)),
            seen_offsets=_offsets(sl),
        )

    def item_batch(self, items: np.ndarray) -> ItemBatch:
        items = np.asarray(items, dtype=np.int64)
        return ItemBatch(features=self._kjt(self._item_bags(items), len(items)), item=torch.from_numpy(items))

    # -- plain query inputs (export, serving parity) ---------------------------------------------
    def query_arrays(self, stage: str, index: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``user [U]``, ``user_features [U, F]`` and 0-padded ``history [U, L]`` of eval users.

        The exported query encoder's input layout; single-valued user features only. ``L`` is the
        longest of these users' bags (at most ``eval_history_length``; at least 1).
        """
        ev = self.eval_users(stage)
        if ev is None:
            raise ValueError(f"{self.path}: no {stage} users")
        index = np.arange(len(ev.users)) if index is None else np.asarray(index)
        users = ev.users[index]
        cols = []
        for f in self.schema.user_features:
            if f.multi_valued:
                raise ValueError(f"user feature {f.name!r} is multi-valued; plain query inputs take one id")
            col = self._users.columns[f.name]
            cols.append(users if col is None else np.asarray(col[users], dtype=np.int64))
        values, lengths = np.zeros(0, dtype=np.int64), np.zeros(len(users), dtype=np.int64)
        if self.schema.history_length:
            values, lengths = self._history(stage).of(ev.first_rows[index])
        history = np.zeros((len(users), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
        if len(values):
            row = np.repeat(np.arange(len(users)), lengths)
            col_pos = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            history[row, col_pos] = values
        return {
            "user": users.astype(np.int64),
            "user_features": np.stack(cols, axis=1) if cols else np.zeros((len(users), 0), dtype=np.int64),
            "history": history,
        }

    # -- Lightning --------------------------------------------------------------------------------
    def make_loader(self, split: str, rank: int, world_size: int) -> GlobalBatches[Any]:
        """``train``, ``val``/``test`` (eval users) or ``items`` (the whole catalog)."""
        common = {"rank": rank, "world_size": world_size, "seed": self.seed}
        if split == "train" and self.train_on == "users":
            items = self.catalog_slice(rank, world_size)
            return GlobalBatches(
                self.training_sequences(), self.batch_size, lambda seq: self.catalog_batch(seq, items),
                shuffle=True, drop_last=False, **common,
            )  # fmt: skip
        if split == "train":
            negatives = self.negatives_per_rank(world_size)
            rows = np.flatnonzero(self.codes == SPLIT_CODES["train"])
            return GlobalBatches(
                rows, self.batch_size, lambda r: self.train_batch(r, negatives),
                shuffle=True, drop_last=True, **common,
            )  # fmt: skip
        if split == "items":
            items = np.arange(1, self.schema.num_items + 1)
            return GlobalBatches(items, self.eval_batch_size, self.item_batch, **common)
        if split in ("val", "test"):
            ev = self.eval_users(split)
            if ev is None:
                raise ValueError(f"{self.path}: no {split} users to evaluate")
            return GlobalBatches(
                np.arange(len(ev.users)), self.eval_batch_size,
                lambda idx, s=split: self.user_batch(s, idx), **common,
            )  # fmt: skip
        raise ValueError(f"unknown stage {split!r}")

    def val_dataloader(self) -> GlobalBatches[UserBatch] | list[Any]:
        # a dataset without a validation split (e.g. the LCF train/test files) skips validation
        return self.loader("val") if self.eval_users("val") is not None else []
