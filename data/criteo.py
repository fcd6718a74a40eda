"""Criteo display-advertising TSV (Kaggle ``dac`` train/test, Criteo 1TB ``day_N``) -> ``ctr`` table.

Rows are ``label, I1..I13, C1..C26`` (40 tab-separated fields; the Kaggle test file has no label,
39 fields); an empty field is a missing value. Features follow TorchRec's Criteo preprocessing:

* ``I*`` -> ``log(1 + max(x, 0))`` as float32, missing -> 0 (the ``dense`` column, width 13);
* ``C*`` (8 hex digits) -> ``1 + int(x, 16) % hash_buckets`` (``--hash-buckets``), or an index into
  a vocabulary of values seen at least ``min_count`` times (``--min-count``, a counting pass
  first); missing or rare values -> 0, the OOV index.

The files can be a terabyte, so nothing here holds a whole file: :func:`iter_criteo` yields one
parsed block (tens of MB) at a time and :func:`prepare_criteo` appends each block to the column
writers of the dataset. Random splits are counter-based (:func:`data.splits.random_split`), so
they do not depend on block size; temporal splits use row order, which is time order in these files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.errors import BadRows, DataError
from data.prepare import IdMap, PrepareResult, bad_rows_meta, check_out, hash_index
from data.shards import SPLIT_CODES, ColumnInfo, ColumnWriter, DatasetWriter
from data.splits import DEFAULT_FRACTIONS, check_fractions, positional_split, random_split
from data.tabular import Field, iter_line_blocks, parse_block

INT_COLUMNS = [f"I{i}" for i in range(1, 14)]
CAT_COLUMNS = [f"C{i}" for i in range(1, 27)]
TEST_FIELDS = [Field(c, "int", required=False) for c in INT_COLUMNS] + [
    Field(c, "hex", required=False) for c in CAT_COLUMNS
]
TRAIN_FIELDS = [Field("label", "int"), *TEST_FIELDS]
DEFAULT_BLOCK_BYTES = 64 << 20
DENSE_TRANSFORM = "log(1 + max(x, 0)), missing -> 0"


def iter_criteo(
    path: Path,
    *,
    labeled: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    bad_rows: BadRows | None = None,
) -> Iterator[pa.Table]:
    """Raw blocks of a Criteo TSV: ``label`` (int64, 0/1; labeled files only), ``I1..I13`` (int64)
    and ``C1..C26`` (``int(x, 16)`` as int64), nulls where a field was empty.

    Malformed rows raise :class:`DataError` with file, line and field (or are counted by
    ``bad_rows`` when skipping). An empty file is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    fields = TRAIN_FIELDS if labeled else TEST_FIELDS
    rows = 0
    for block, first_line in iter_line_blocks(path, block_bytes):
        parsed = parse_block(block, first_line, path, fields, sep="\t", bad_rows=bad_rows)
        if labeled:
            label = parsed.numpy("label")
            parsed = parsed.reject(
                (label != 0) & (label != 1),
                "label",
                lambda i, v=label: f"label must be 0 or 1, got {v[i]}",
                bad_rows,
            )
        if len(parsed):
            rows += len(parsed)
            yield parsed.table
    if rows == 0:
        raise DataError(path, None, None, "empty file (no valid rows)")


def dense_features(block: pa.Table) -> np.ndarray:
    """``[rows, 13]`` float32: ``log(1 + max(x, 0))`` of I1..I13, missing -> 0."""
    ints = np.stack([pc.fill_null(block[c], 0).to_numpy() for c in INT_COLUMNS], axis=1)
    return np.log1p(np.maximum(ints, 0)).astype(np.float32)


def raw_categoricals(block: pa.Table) -> list[np.ndarray]:
    """``int(x, 16)`` per categorical column, -1 where missing."""
    return [pc.fill_null(block[c], -1).to_numpy() for c in CAT_COLUMNS]


class _ValueCounter:
    """Distinct values and their counts over a stream, merged lazily to keep it O(distinct)."""

    def __init__(self) -> None:
        self.values = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, values: np.ndarray) -> None:
        uniq, counts = np.unique(values, return_counts=True)
        self._pending.append((uniq, counts))
        self._pending_size += len(uniq)
        if self._pending_size > max(1 << 20, len(self.values)):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        values = np.concatenate([self.values, *(v for v, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self.values, inverse = np.unique(values, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=len(self.values)).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.values, self.counts


class CategoricalEncoder:
    """C1..C26 raw values -> indices: hashed, or through per-column vocabularies."""

    def __init__(self, hash_buckets: int | None = None, idmaps: Sequence[IdMap] | None = None) -> None:
        if (hash_buckets is None) == (idmaps is None):
            raise ValueError("give exactly one of hash_buckets / idmaps")
        self.hash_buckets = hash_buckets
        self.idmaps = list(idmaps) if idmaps is not None else None

    def encode(self, k: int, raw: np.ndarray) -> np.ndarray:
        if self.hash_buckets is not None:
            return np.where(raw < 0, 0, hash_index(raw, self.hash_buckets))
        assert self.idmaps is not None
        return np.where(raw < 0, 0, self.idmaps[k].lookup(raw))

    def info(self, k: int) -> ColumnInfo:
        if self.hash_buckets is not None:
            return ColumnInfo("int64", vocab=self.hash_buckets + 1, hash_buckets=self.hash_buckets)
        assert self.idmaps is not None
        return ColumnInfo("int64", vocab=self.idmaps[k].vocab, idmap=CAT_COLUMNS[k])

    def spec(self, k: int, min_count: int | None) -> dict[str, Any]:
        base = {"name": CAT_COLUMNS[k], "kind": "sparse", "vocab": self.info(k).vocab, "multi_valued": False}
        base["source"] = CAT_COLUMNS[k]
        if self.hash_buckets is not None:
            return {
                **base,
                "hash_buckets": self.hash_buckets,
                "index": "0 if empty else 1 + int(x, 16) % hash_buckets",
            }
        return {
            **base,
            "idmap": CAT_COLUMNS[k],
            "min_count": min_count,
            "index": "0 if empty or not in idmap else position of int(x, 16) in idmap + 1",
        }


def count_vocabularies(
    inputs: Sequence[Path], min_count: int, block_bytes: int, bad_rows: BadRows
) -> list[IdMap]:
    """Pass 1 of ``--min-count``: per-column values seen at least ``min_count`` times."""
    counters = [_ValueCounter() for _ in CAT_COLUMNS]
    for path in inputs:
        for block in iter_criteo(path, block_bytes=block_bytes, bad_rows=bad_rows):
            for counter, raw in zip(counters, raw_categoricals(block), strict=True):
                counter.add(raw[raw >= 0])
    return [IdMap.from_counts(*c.result(), min_count=min_count) for c in counters]


def _write_features(
    w: DatasetWriter, table: str, encoder: CategoricalEncoder
) -> tuple[list[ColumnWriter], ColumnWriter]:
    cats = [w.column_writer(table, c, encoder.info(k)) for k, c in enumerate(CAT_COLUMNS)]
    dense = w.column_writer(
        table,
        "dense",
        ColumnInfo("float32", width=len(INT_COLUMNS), names=list(INT_COLUMNS)),
        (len(INT_COLUMNS),),
    )
    assert all(isinstance(x, ColumnWriter) for x in cats) and isinstance(dense, ColumnWriter)
    return cats, dense  # type: ignore[return-value]


def _append_features(
    block: pa.Table, encoder: CategoricalEncoder, cats: list[ColumnWriter], dense: ColumnWriter
) -> None:
    for k, (writer, raw) in enumerate(zip(cats, raw_categoricals(block), strict=True)):
        writer.append(encoder.encode(k, raw))
    dense.append(dense_features(block))


def prepare_criteo(
    inputs: Sequence[Path],
    out: Path,
    *,
    hash_buckets: int | None = None,
    min_count: int | None = None,
    test_file: Path | None = None,
    ctr_split: str = "random",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    name: str | None = None,
) -> PrepareResult:
    """Stream Criteo TSV files (in time order) into a ``ctr`` table.

    ``inputs`` are labelled files (Kaggle ``train.txt`` or ``day_0 .. day_23``), concatenated in
    the given order. ``test_file`` (Kaggle ``test.txt``, no labels) goes to a separate
    ``ctr_unlabeled`` table with the same feature columns, encoded with the same vocabulary.
    """
    started = time.perf_counter()
    if (hash_buckets is None) == (min_count is None):
        raise ValueError("give exactly one of hash_buckets (--hash-buckets) and min_count (--min-count)")
    if ctr_split not in ("random", "temporal"):
        raise ValueError(f"ctr split must be random or temporal, got {ctr_split!r}")
    fractions = check_fractions(fractions)
    inputs = [Path(p) for p in inputs]
    check_out(out, overwrite)
    bad_rows = BadRows(skip=skip_bad_rows)
    if min_count is not None:
        idmaps = count_vocabularies(inputs, min_count, block_bytes, BadRows(skip=skip_bad_rows))
        encoder = CategoricalEncoder(idmaps=idmaps)
    else:
        encoder = CategoricalEncoder(hash_buckets=hash_buckets)
    counts: dict[str, int] = {}
    split_totals = np.zeros(3, dtype=np.int64)
    with DatasetWriter(out, name or f"criteo:{inputs[0].stem}", overwrite=overwrite) as w:
        w.source = {"format": "criteo", "inputs": [str(p) for p in inputs]}
        cats, dense = _write_features(w, "ctr", encoder)
        label_w = w.column_writer("ctr", "label", ColumnInfo("float32"))
        split_w = w.column_writer("ctr", "split", ColumnInfo("uint8"))
        rows = positives = 0
        for path in inputs:
            for block in iter_criteo(path, block_bytes=block_bytes, bad_rows=bad_rows):
                n = block.num_rows
                _append_features(block, encoder, cats, dense)
                label = pc.cast(block["label"], pa.float32()).to_numpy()
                label_w.append(label)
                positives += int(label.sum())
                if ctr_split == "random":
                    codes = random_split(n, fractions, seed, offset=rows)
                    split_w.append(codes)
                    split_totals += np.bincount(codes, minlength=3)
                rows += n
        if ctr_split == "temporal":  # needs the total row count: written after the pass
            step = 1 << 22
            for offset in range(0, rows, step):
                codes = positional_split(min(step, rows - offset), rows, fractions, offset)
                split_w.append(codes)
                split_totals += np.bincount(codes, minlength=3)
        counts.update(ctr_rows=rows, ctr_positives=positives)
        if test_file is not None:
            t_cats, t_dense = _write_features(w, "ctr_unlabeled", encoder)
            unlabeled = 0
            for block in iter_criteo(
                Path(test_file), labeled=False, block_bytes=block_bytes, bad_rows=bad_rows
            ):
                _append_features(block, encoder, t_cats, t_dense)
                unlabeled += block.num_rows
            counts["ctr_unlabeled_rows"] = unlabeled
            w.source["test_file"] = str(test_file)
        if encoder.idmaps is not None:
            for column, idmap in zip(CAT_COLUMNS, encoder.idmaps, strict=True):
                w.write_idmap(column, idmap.raw)
        totals = {split: int(split_totals[code]) for split, code in SPLIT_CODES.items()}
        splits = {"ctr": {"kind": ctr_split, **totals}}
        w.counts = counts
        w.meta_extra = {
            "bad_rows": bad_rows_meta(bad_rows),
            "splits": {**splits, "fractions": list(fractions), "seed": seed},
            "feature_spec": [encoder.spec(k, min_count) for k in range(len(CAT_COLUMNS))]
            + [
                {
                    "name": "dense",
                    "kind": "dense",
                    "vocab": None,
                    "multi_valued": False,
                    "width": len(INT_COLUMNS),
                    "names": list(INT_COLUMNS),
                    "transforms": [
                        {"name": c, "source": c, "transform": DENSE_TRANSFORM} for c in INT_COLUMNS
                    ],
                }
            ],
            "ctr_label": {"source": "label field (0/1)"},
        }
    name = name or f"criteo:{inputs[0].stem}"
    return PrepareResult(Path(out), name, counts, bad_rows, splits, time.perf_counter() - started)
