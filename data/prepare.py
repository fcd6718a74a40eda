"""Raw tables -> a prepared dataset (``data.shards`` layout): id maps, splits and every table.

What gets written (see ``data/shards.py`` for the storage layout):

* ``interactions``: ``user``, ``item`` (indices), ``timestamp``, ``rating`` / ``label`` when the
  source has them, ``split`` (uint8). Rows are sorted by user, then time (stable), so the rows of
  sequence ``r`` are exactly ``interactions[offsets[r]:offsets[r + 1]]``.
* ``sequences``: ``user`` and the jagged, time-ordered ``items`` of every user with interactions.
* ``users`` / ``items``: side features, row ``i`` = index ``i``, row 0 (OOV) all zeros.
  Categorical columns are index-mapped with their own id map; list columns are jagged; numeric
  columns are z-scored float32 with 0 (the mean) for unknown values.
* ``ctr`` (when the data has ratings or labels): one row per labelled interaction with ``user``,
  ``item``, every categorical side feature of that user and item, ``dense`` (the numeric side
  features), ``label`` and ``split``. Ratings become labels as RecBole does for MovieLens:
  ``rating >= 4`` -> 1, ``rating <= 2`` -> 0, anything between (3, half stars 2.5-3.5) dropped and
  counted in ``counts.ctr_dropped_neutral``.

Every categorical field goes through :class:`IdMap` (raw id -> 1..n, 0 = OOV/padding) or, for
huge vocabularies, :func:`hash_index`; ``meta.json`` gets a ``feature_spec`` precise enough for a
server to rebuild every CTR feature from raw values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.errors import BadRows, DataError
from data.shards import ColumnInfo, DatasetWriter, Jagged, PreparedDataset
from data.splits import (
    DEFAULT_FRACTIONS,
    check_fractions,
    make_split,
    random_split,
    split_counts,
    temporal_split,
    time_order,
)
from data.tabular import RawTables, to_numpy

# the hash is part of the artifact format a server decodes, so the format module owns it
from serving.features import stable_hash

CTR_SPLITS = ("random", "temporal")


# -- id maps and hashing -------------------------------------------------------------------------


@dataclass
class IdMap:
    """Contiguous indices for one categorical field: ``raw[i]`` has index ``i + 1``; 0 is OOV.

    Raw ids are kept sorted, so lookups are a vectorised binary search and datasets whose ids are
    already ``1..n`` (SASRec) keep index == raw id.
    """

    raw: np.ndarray

    @classmethod
    def from_values(cls, values: np.ndarray, min_count: int = 1) -> IdMap:
        """Every distinct value (seen at least ``min_count`` times) gets an index."""
        values = np.asarray(values)
        if min_count <= 1:
            return cls(np.unique(values))
        uniq, counts = np.unique(values, return_counts=True)
        return cls(uniq[counts >= min_count])

    @classmethod
    def from_counts(cls, values: np.ndarray, counts: np.ndarray, min_count: int = 1) -> IdMap:
        """From already-counted distinct values (streamed vocabularies, e.g. Criteo)."""
        values = np.asarray(values)
        keep = np.asarray(counts) >= min_count
        return cls(np.sort(values[keep]))

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def vocab(self) -> int:
        """Embedding rows needed: the ids plus the OOV row."""
        return len(self.raw) + 1

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Indices of ``values`` (int64); ids not in the map get 0."""
        values = np.asarray(values)
        if len(self.raw) == 0 or len(values) == 0:
            return np.zeros(len(values), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.raw, values), len(self.raw) - 1)
        return np.where(self.raw[pos] == values, pos + 1, 0).astype(np.int64)


def hash_index(values: np.ndarray, buckets: int) -> np.ndarray:
    """``1 + stable_hash(x) % buckets``: hashed indices that keep 0 free for OOV/padding."""
    if buckets < 1:
        raise ValueError(f"hash buckets must be >= 1, got {buckets}")
    return (stable_hash(values) % np.uint64(buckets)).astype(np.int64) + 1


@dataclass
class IdField:
    """How one id field (``user``/``item``) is encoded: an :class:`IdMap` or hashing."""

    name: str
    idmap: IdMap
    hash_buckets: int | None = None

    def encode(self, raw: np.ndarray) -> np.ndarray:
        return hash_index(raw, self.hash_buckets) if self.hash_buckets else self.idmap.lookup(raw)

    @property
    def vocab(self) -> int:
        return self.hash_buckets + 1 if self.hash_buckets else self.idmap.vocab

    def info(self) -> ColumnInfo:
        if self.hash_buckets:
            return ColumnInfo("int64", vocab=self.vocab, hash_buckets=self.hash_buckets)
        return ColumnInfo("int64", vocab=self.vocab, idmap=self.name)

    def spec(self) -> dict[str, Any]:
        if self.hash_buckets:
            return {"hash_buckets": self.hash_buckets, "index": "1 + stable_hash(raw) % hash_buckets"}
        return {"idmap": self.name, "index": "position in idmap + 1, 0 if unknown"}


# -- results -------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    """What ``funnel data prepare`` reports: where the dataset went and what it holds."""

    path: Path
    name: str
    counts: dict[str, int]
    bad_rows: BadRows
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def report(self) -> str:
        c = self.counts
        out = [f"prepared {self.name} -> {self.path}"]
        if "interactions" in c:
            out.append(f"interactions {c['interactions']:,}  users {c['users']:,}  items {c['items']:,}")
        if "ctr_rows" in c:
            line = f"ctr rows {c['ctr_rows']:,}"
            if "ctr_positives" in c:
                line += f"  positives {c['ctr_positives']:,}"
            if c.get("ctr_dropped_neutral"):
                line += f"  (neutral ratings dropped: {c['ctr_dropped_neutral']:,})"
            out.append(line)
        if c.get("ctr_unlabeled_rows"):
            out.append(f"unlabeled rows (ctr_unlabeled) {c['ctr_unlabeled_rows']:,}")
        for table, s in self.splits.items():
            out.append(
                f"{table} split {s['kind']}: train {s['train']:,}  val {s['val']:,}  test {s['test']:,}"
            )
        out.append(self.bad_rows.report())
        out.append(f"elapsed {self.seconds:.1f}s")
        return "\n".join(out)


def bad_rows_meta(bad_rows: BadRows) -> dict[str, Any]:
    return {"count": bad_rows.count, "examples": list(bad_rows.examples)}


def check_out(out: Path, overwrite: bool) -> None:
    """Fail before reading gigabytes when the output exists (DatasetWriter would, but later)."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")


# -- side features -------------------------------------------------------------------------------


@dataclass
class SideFeature:
    """One side-table feature, laid out by entity index (row 0 = OOV)."""

    name: str
    table: str  # "users" or "items"
    kind: str  # "categorical", "jagged" or "numeric"
    values: np.ndarray | Jagged
    spec: dict[str, Any]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _write_side_table(
    w: DatasetWriter, table: str, data: pa.Table, key: str, ids: IdField, raw: RawTables, used: set[str]
) -> list[SideFeature]:
    """Write ``users``/``items`` and return their features for the CTR table."""
    rows = ids.idmap.lookup(to_numpy(data[key]))
    n = ids.vocab
    entity = ids.name
    features: list[SideFeature] = []
    for col in data.column_names:
        if col == key:
            continue
        arr = data[col]
        if col in raw.text:  # titles: a lookup array for display, never a feature
            texts = np.full(n - 1, "", dtype=object)
            texts[rows - 1] = to_numpy(pc.fill_null(arr, ""))
            w.write_idmap(f"{entity}_{col}", texts.astype(str))
            continue
        if col in used:
            raise ValueError(f"side feature name {col!r} is used twice (id maps are named by column)")
        used.add(col)
        note = {"source": f"{table}.{col}", **raw.notes.get(col, {})}
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            flat = to_numpy(pc.list_flatten(arr))
            vm = IdMap.from_values(flat)
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
            by_row = Jagged(vm.lookup(flat), np.r_[0, np.cumsum(lengths)])
            order = np.argsort(rows)  # rows are a permutation of 1..n-1
            values, row_lengths = by_row.take(order)
            all_lengths = np.zeros(n, dtype=np.int64)
            all_lengths[1:] = row_lengths
            w.write_jagged(table, col, values, all_lengths, ColumnInfo("int64", vocab=vm.vocab, idmap=col))
            w.write_idmap(col, vm.raw)
            jagged = Jagged(values, np.r_[0, np.cumsum(all_lengths)])
            spec = {"idmap": col, "vocab": vm.vocab, "multi_valued": True, **note}
            features.append(SideFeature(col, table, "jagged", jagged, spec))
        elif _is_text(arr.type) or col in raw.categorical:
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            vals = to_numpy(arr.filter(pa.array(valid)))
            vm = IdMap.from_values(vals)
            idx = np.zeros(n, dtype=np.int64)
            idx[rows[valid]] = vm.lookup(vals)
            w.write_column(table, col, idx, ColumnInfo("int64", vocab=vm.vocab, idmap=col))
            w.write_idmap(col, vm.raw)
            spec = {"idmap": col, "vocab": vm.vocab, "multi_valued": False, **note}
            features.append(SideFeature(col, table, "categorical", idx, spec))
        elif pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
            v = pc.fill_null(pc.cast(arr, pa.float64()), np.nan).to_numpy()
            known = np.isfinite(v)
            mean = float(v[known].mean()) if known.any() else 0.0
            std = float(v[known].std()) if known.any() else 1.0
            std = std if std > 0 else 1.0
            z = np.where(known, (v - mean) / std, 0.0)
            dense = np.zeros(n, dtype=np.float32)
            dense[rows] = z
            w.write_column(table, col, dense, ColumnInfo("float32"))
            spec = {"transform": "zscore", "mean": mean, "std": std, "missing": 0.0, **note}
            features.append(SideFeature(col, table, "numeric", dense, spec))
        else:
            raise TypeError(f"{table}.{col}: unsupported side-feature type {arr.type}")
    return features


# -- the pipeline --------------------------------------------------------------------------------


def prepare_tables(
    raw: RawTables,
    out: Path,
    *,
    split: str = "loo",
    ctr_split: str = "random",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    hash_buckets: Mapping[str, int] | None = None,
    positive_min: float = 4.0,
    negative_max: float = 2.0,
    overwrite: bool = False,
    name: str | None = None,
) -> PrepareResult:
    """Write ``raw`` as a prepared dataset at ``out`` (atomically) and return its counts.

    ``split`` (``loo``/``temporal``/``random``) assigns interactions unless the data brings its own
    ``split`` column; ``ctr_split`` (``random``/``temporal``) assigns CTR rows. ``hash_buckets``
    (``{"user": B, "item": B}``) hashes an id field instead of mapping it (datasets without side
    tables only: side tables are addressed by index).
    """
    started = time.perf_counter()
    fractions = check_fractions(fractions)
    if ctr_split not in CTR_SPLITS:
        raise ValueError(f"ctr split must be one of {CTR_SPLITS}, got {ctr_split!r}")
    hash_buckets = dict(hash_buckets or {})
    inter = raw.interactions
    uid, iid = to_numpy(inter["user_id"]), to_numpy(inter["item_id"])
    n = len(uid)
    if n == 0:
        raise DataError(raw.source.get("path", raw.name), None, None, "no interactions to prepare")
    has_side = any(t is not None and t.num_columns > 1 for t in (raw.users, raw.items))
    if hash_buckets and has_side:
        raise ValueError("hashed user/item ids cannot address side tables; hash only datasets without them")
    # side tables, when present, define the known ids (a movie nobody rated still has features)
    known_users = to_numpy(raw.users["user_id"]) if raw.users is not None else uid
    known_items = to_numpy(raw.items["item_id"]) if raw.items is not None else iid
    users = IdField("user", IdMap.from_values(known_users), hash_buckets.get("user"))
    items = IdField("item", IdMap.from_values(known_items), hash_buckets.get("item"))
    user_key = users.idmap.lookup(uid)  # dense per-raw-id key: groups users even when hashed
    if (user_key == 0).any() or (items.idmap.lookup(iid) == 0).any():
        raise ValueError("interactions reference ids missing from the side tables (reader bug)")
    ts = to_numpy(inter["timestamp"]) if "timestamp" in inter.column_names else np.arange(n, dtype=np.int64)

    order = time_order(user_key, ts)
    user_key, ts = user_key[order], ts[order]
    u_idx, i_idx = users.encode(uid[order]), items.encode(iid[order])
    if "split" in inter.column_names:
        codes = to_numpy(inter["split"])[order].astype(np.uint8)
        split_kind = "given"
    else:
        codes = make_split(split, user_key, ts, fractions=fractions, seed=seed)
        split_kind = split
    splits = {"interactions": {"kind": split_kind, **split_counts(codes)}}
    counts: dict[str, int] = {"interactions": n, "users": len(users.idmap), "items": len(items.idmap)}
    extra: dict[str, Any] = {"bad_rows": bad_rows_meta(raw.bad_rows)}

    out = Path(out)
    with DatasetWriter(out, name or raw.name, overwrite=overwrite) as w:
        w.source = dict(raw.source)
        w.write_column("interactions", "user", u_idx, users.info())
        w.write_column("interactions", "item", i_idx, items.info())
        w.write_column("interactions", "timestamp", ts.astype(np.int64), ColumnInfo("int64"))
        for col in ("rating", "label"):
            if col in inter.column_names:
                w.write_column(
                    "interactions", col, to_numpy(inter[col])[order].astype(np.float32), ColumnInfo("float32")
                )
        w.write_column("interactions", "split", codes, ColumnInfo("uint8"))

        starts = np.flatnonzero(np.r_[True, user_key[1:] != user_key[:-1]])
        lengths = np.diff(np.r_[starts, n])
        w.write_column("sequences", "user", u_idx[starts], users.info())
        w.write_jagged("sequences", "items", i_idx, lengths, items.info())
        counts["sequences_rows"] = len(starts)

        if not users.hash_buckets:
            w.write_idmap("user", users.idmap.raw)
        if not items.hash_buckets:
            w.write_idmap("item", items.idmap.raw)
        used = {"user", "item"}
        side: list[SideFeature] = []
        for table, data, key, ids in (
            ("users", raw.users, "user_id", users),
            ("items", raw.items, "item_id", items),
        ):
            if data is not None and data.num_columns > 1:
                side += _write_side_table(w, table, data, key, ids, raw, used)
                counts[f"{table}_rows"] = ids.vocab

        labels, keep, label_spec = _ctr_labels(inter, order, positive_min, negative_max)
        if labels is not None:
            ctr_codes = _write_ctr(
                w, u_idx[keep], i_idx[keep], ts[keep], labels, side, users, items, ctr_split, fractions, seed
            )
            counts.update(ctr_rows=len(labels), ctr_positives=int((labels == 1).sum()))
            counts["ctr_dropped_neutral"] = int(n - keep.sum())
            splits["ctr"] = {"kind": ctr_split, **split_counts(ctr_codes)}
            extra["feature_spec"] = _feature_spec(side, users, items)
            extra["ctr_label"] = label_spec
        counts["interactions_rows"] = n
        w.counts = counts
        extra["splits"] = {**splits, "fractions": list(fractions), "seed": seed}
        w.meta_extra = extra
    return PrepareResult(out, name or raw.name, counts, raw.bad_rows, splits, time.perf_counter() - started)


def _ctr_labels(
    inter: pa.Table, order: np.ndarray, positive_min: float, negative_max: float
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """``(labels, keep mask over sorted interactions, spec)``; labels None for implicit data."""
    if "label" in inter.column_names:
        labels = to_numpy(inter["label"])[order].astype(np.float32)
        return labels, np.ones(len(labels), dtype=bool), {"source": "label column"}
    if "rating" in inter.column_names:
        r = to_numpy(inter["rating"])[order]
        keep = (r >= positive_min) | (r <= negative_max)
        labels = (r[keep] >= positive_min).astype(np.float32)
        spec = {
            "source": "rating",
            "positive": f"rating >= {positive_min}",
            "negative": f"rating <= {negative_max}",
            "dropped": f"{negative_max} < rating < {positive_min}",
        }
        return labels, keep, spec
    return None, np.zeros(0, dtype=bool), {}


def _write_ctr(
    w: DatasetWriter,
    u_idx: np.ndarray,
    i_idx: np.ndarray,
    ts: np.ndarray,
    labels: np.ndarray,
    side: list[SideFeature],
    users: IdField,
    items: IdField,
    ctr_split: str,
    fractions: Sequence[float],
    seed: int,
) -> np.ndarray:
    w.write_column("ctr", "user", u_idx, users.info())
    w.write_column("ctr", "item", i_idx, items.info())
    dense: list[np.ndarray] = []
    for f in side:
        idx = u_idx if f.table == "users" else i_idx
        if f.kind == "categorical":
            assert isinstance(f.values, np.ndarray)
            w.write_column(
                "ctr", f.name, f.values[idx], ColumnInfo("int64", vocab=f.spec["vocab"], idmap=f.name)
            )
        elif f.kind == "jagged":
            assert isinstance(f.values, Jagged)
            values, lengths = f.values.take(idx)
            w.write_jagged(
                "ctr", f.name, values, lengths, ColumnInfo("int64", vocab=f.spec["vocab"], idmap=f.name)
            )
        else:
            assert isinstance(f.values, np.ndarray)
            dense.append(f.values[idx])
    names = [f.name for f in side if f.kind == "numeric"]
    matrix = np.stack(dense, axis=1) if dense else np.zeros((len(labels), 0), dtype=np.float32)
    w.write_column(
        "ctr", "dense", matrix.astype(np.float32), ColumnInfo("float32", width=len(names), names=names)
    )
    w.write_column("ctr", "label", labels, ColumnInfo("float32"))
    if ctr_split == "temporal":
        codes = temporal_split(ts, fractions)
    else:
        codes = random_split(len(labels), fractions, seed)
    w.write_column("ctr", "split", codes, ColumnInfo("uint8"))
    return codes


def _feature_spec(side: list[SideFeature], users: IdField, items: IdField) -> list[dict[str, Any]]:
    """One entry per CTR feature column, in column order (``kind`` sparse/dense like data.synthetic)."""
    spec: list[dict[str, Any]] = []
    for ids, source in ((users, "interactions.user_id"), (items, "interactions.item_id")):
        spec.append(
            {
                "name": ids.name,
                "kind": "sparse",
                "vocab": ids.vocab,
                "multi_valued": False,
                "source": source,
                **ids.spec(),
            }
        )
    for f in side:
        if f.kind != "numeric":
            via = "user" if f.table == "users" else "item"
            spec.append({"name": f.name, "kind": "sparse", "lookup": f"{f.table}[{via} index]", **f.spec})
    numeric = [f for f in side if f.kind == "numeric"]
    spec.append(
        {
            "name": "dense",
            "kind": "dense",
            "vocab": None,
            "multi_valued": False,
            "width": len(numeric),
            "names": [f.name for f in numeric],
            "transforms": [
                {
                    "name": f.name,
                    "lookup": f"{f.table}[{'user' if f.table == 'users' else 'item'} index]",
                    **f.spec,
                }
                for f in numeric
            ],
        }
    )
    return spec


# -- entry points per source ---------------------------------------------------------------------


def _prepare_from(
    read: Callable[[BadRows], Any], out: Path, *, skip_bad_rows: bool, overwrite: bool, **tables: Any
) -> PrepareResult:
    """Check ``out``, read the source (``read(bad_rows)``), write the tables; timed end to end."""
    started = time.perf_counter()
    check_out(out, overwrite)
    raw = read(BadRows(skip=skip_bad_rows))
    result = prepare_tables(raw, out, overwrite=overwrite, **tables)
    result.seconds = time.perf_counter() - started
    return result


def prepare_movielens(
    input_dir: Path,
    out: Path,
    *,
    ratings_file: Path | None = None,
    split: str = "loo",
    ctr_split: str = "random",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    name: str | None = None,
) -> PrepareResult:
    """MovieLens directory (any release) -> prepared dataset with users/items/ctr tables."""
    from data.movielens import movielens_features, read_movielens

    return _prepare_from(
        lambda bad: movielens_features(read_movielens(input_dir, ratings_file=ratings_file, bad_rows=bad)),
        out,
        skip_bad_rows=skip_bad_rows,
        overwrite=overwrite,
        split=split,
        ctr_split=ctr_split,
        fractions=fractions,
        seed=seed,
        name=name,
    )


def prepare_sasrec(
    path: Path,
    out: Path,
    *,
    split: str = "loo",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    name: str | None = None,
) -> PrepareResult:
    """SASRec ``user item`` file -> interactions + sequences (leave-one-out by default)."""
    from data.sequences import read_sasrec

    return _prepare_from(
        lambda bad: read_sasrec(path, bad_rows=bad),
        out,
        skip_bad_rows=skip_bad_rows,
        overwrite=overwrite,
        split=split,
        fractions=fractions,
        seed=seed,
        name=name,
    )


def prepare_user_items(
    path: Path,
    out: Path,
    *,
    test_path: Path | None = None,
    one_based: bool = False,
    split: str = "loo",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    name: str | None = None,
) -> PrepareResult:
    """One-line-per-user file (optionally with its test file, which then fixes the split)."""
    from data.sequences import read_user_items

    return _prepare_from(
        lambda bad: read_user_items(path, test_path=test_path, one_based=one_based, bad_rows=bad),
        out,
        skip_bad_rows=skip_bad_rows,
        overwrite=overwrite,
        split=split,
        fractions=fractions,
        seed=seed,
        name=name,
    )


def prepare_tabular(
    path: Path,
    out: Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str | None = None,
    rating_col: str | None = None,
    label_col: str | None = None,
    sep: str = ",",
    hash_buckets: Mapping[str, int] | None = None,
    split: str = "loo",
    ctr_split: str = "random",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    name: str | None = None,
) -> PrepareResult:
    """Generic CSV/Parquet interactions with named columns."""
    from data.tabular import read_tabular

    def read(bad: BadRows) -> Any:
        return read_tabular(
            path,
            user_col=user_col,
            item_col=item_col,
            time_col=time_col,
            rating_col=rating_col,
            label_col=label_col,
            sep=sep,
            bad_rows=bad,
        )

    return _prepare_from(
        read,
        out,
        skip_bad_rows=skip_bad_rows,
        overwrite=overwrite,
        split=split,
        ctr_split=ctr_split,
        fractions=fractions,
        seed=seed,
        hash_buckets=hash_buckets,
        name=name,
    )


# -- inspection ----------------------------------------------------------------------------------


def describe(path: Path) -> str:
    """Human-readable summary of a prepared dataset (``funnel data info``)."""
    ds = PreparedDataset(path)
    m = ds.meta
    out = [f"{ds.path}: {ds.name} (created {m.get('created_at', '?')})"]
    if m.get("source"):
        out.append("source: " + ", ".join(f"{k}={v}" for k, v in m["source"].items() if k != "files"))
    if ds.counts:
        out.append("counts: " + "  ".join(f"{k} {v:,}" for k, v in ds.counts.items()))
    for table, info in ds.tables.items():
        out.append(f"{table}: {info.rows:,} rows")
        for col, c in info.columns.items():
            bits = [c.dtype + ("[]" if c.jagged else "")]
            if c.width is not None:
                bits.append(f"width {c.width}")
            if c.vocab is not None:
                bits.append(f"vocab {c.vocab:,}")
            if c.hash_buckets is not None:
                bits.append(f"hashed {c.hash_buckets:,}")
            out.append(f"  {col}: " + ", ".join(bits))
    for table, s in m.get("splits", {}).items():
        if isinstance(s, dict) and "kind" in s:
            out.append(
                f"{table} split {s['kind']}: train {s['train']:,}  val {s['val']:,}  test {s['test']:,}"
            )
    bad = m.get("bad_rows") or {}
    out.append(f"bad rows skipped: {bad['count']:,}" if bad.get("count") else "bad rows: 0")
    return "\n".join(out)
