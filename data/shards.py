"""Prepared-dataset storage: memory-mapped column arrays, id maps and a ``meta.json``.

Layout of a prepared dataset directory::

    meta.json                      format_version, name, source, counts, tables, idmaps, extra
    <table>/<column>.npy           one value per row (int64 categorical indices, float32 dense, ...)
    <table>/<column>.values.npy    jagged column: concatenated values ...
    <table>/<column>.offsets.npy   ... and int64 offsets (rows + 1)
    idmaps/<field>.npy             index -> raw id (int64 or unicode); index 0 is the OOV/padding bucket

Tables used by the tasks:

* ``interactions``: ``user``, ``item`` (indices), optional ``timestamp``, ``rating``, ``split``.
* ``users`` / ``items``: side features, row ``i`` belongs to index ``i`` (row 0 = OOV bucket).
* ``sequences``: ``user`` and the jagged, time-ordered ``items`` of each user.
* ``ctr``: single-valued sparse feature columns, jagged multi-valued ones, ``dense`` (float32
  ``[rows, n_dense]``), ``label`` (float32) and ``split`` (uint8, see ``SPLIT_CODES``).

Every categorical field maps raw ids to contiguous indices ``1..n``; index ``0`` is reserved for
unknown ids (out-of-vocabulary) and for padding. A field may instead be hashed
(``{"hash_buckets": B}`` in its column info), in which case no id map is stored.

A dataset is written into a temporary sibling directory and renamed into place only when complete,
so a failure never leaves a partial dataset behind. Columns can be appended chunk by chunk
(:class:`ColumnWriter`), so datasets larger than memory stream to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
OOV_INDEX = 0

_NPY_HEADER_BYTES = 128  # fixed-size header so a column's final length can be patched in place


@dataclass
class ColumnInfo:
    """What a column holds; stored in ``meta.json`` under ``tables.<table>.columns.<name>``."""

    dtype: str
    jagged: bool = False
    vocab: int | None = None  # embedding rows needed for this field (OOV bucket included)
    idmap: str | None = None  # name of the id map that decodes indices to raw ids
    hash_buckets: int | None = None
    width: int | None = None  # for 2-D columns such as ``dense``
    names: list[str] | None = None  # names of the 2-D column's sub-columns

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ColumnInfo:
        return cls(**d)


@dataclass
class TableInfo:
    rows: int
    columns: dict[str, ColumnInfo] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "columns": {k: c.to_json() for k, c in self.columns.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TableInfo:
        return cls(rows=d["rows"], columns={k: ColumnInfo.from_json(v) for k, v in d["columns"].items()})


def _write_npy_header(f: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    text = repr(header).encode("latin1")
    prefix = b"\x93NUMPY\x01\x00"
    body_len = _NPY_HEADER_BYTES - len(prefix) - 2
    if len(text) + 1 > body_len:
        raise ValueError(f"npy header too long for shape {shape}")
    f.write(prefix + struct.pack("<H", body_len) + text.ljust(body_len - 1) + b"\n")


class ColumnWriter:
    """Appends rows of one dtype (and fixed trailing shape) to a ``.npy`` file in chunks."""

    def __init__(self, path: Path, dtype: np.dtype | str, trailing_shape: tuple[int, ...] = ()) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.trailing_shape = tuple(trailing_shape)
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        _write_npy_header(self._f, self.dtype, (0, *self.trailing_shape))

    def append(self, chunk: np.ndarray) -> None:
        arr = np.ascontiguousarray(chunk, dtype=self.dtype)
        if arr.shape[1:] != self.trailing_shape:
            raise ValueError(
                f"{self.path.name}: chunk shape {arr.shape} does not end in {self.trailing_shape}"
            )
        self._f.write(arr.tobytes())
        self.rows += arr.shape[0]

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.seek(0)
        _write_npy_header(self._f, self.dtype, (self.rows, *self.trailing_shape))
        self._f.close()


class JaggedColumnWriter:
    """Appends variable-length rows as a values array plus int64 offsets."""

    def __init__(self, path_prefix: Path, dtype: np.dtype | str) -> None:
        self.values = ColumnWriter(Path(f"{path_prefix}.values.npy"), dtype)
        self.offsets = ColumnWriter(Path(f"{path_prefix}.offsets.npy"), np.int64)
        self.offsets.append(np.zeros(1, dtype=np.int64))
        self._total = 0

    @property
    def rows(self) -> int:
        return self.offsets.rows - 1

    def append(self, values: np.ndarray, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(values):
            raise ValueError("jagged chunk: lengths do not add up to the number of values")
        self.values.append(values)
        self.offsets.append(self._total + np.cumsum(lengths))
        self._total += int(lengths.sum())

    def close(self) -> None:
        self.values.close()
        self.offsets.close()


class DatasetWriter:
    """Builds a prepared dataset in a temporary directory; :meth:`commit` renames it into place.

    Use as a context manager: leaving the block with an exception removes the temporary directory
    and leaves any existing dataset at ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike[str], name: str, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.name = name
        self.overwrite = overwrite
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True (--overwrite) to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self.tables: dict[str, TableInfo] = {}
        self.idmaps: dict[str, str] = {}
        self.meta_extra: dict[str, Any] = {}
        self.source: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self._open: list[ColumnWriter | JaggedColumnWriter] = []

    # -- columns ---------------------------------------------------------------------------
    def column_writer(
        self, table: str, column: str, info: ColumnInfo, trailing_shape: tuple[int, ...] = ()
    ) -> ColumnWriter | JaggedColumnWriter:
        """A writer for a column whose rows arrive in chunks (close happens at commit)."""
        self.tables.setdefault(table, TableInfo(rows=0)).columns[column] = info
        prefix = self.tmp / table / column
        w: ColumnWriter | JaggedColumnWriter
        if info.jagged:
            w = JaggedColumnWriter(prefix, info.dtype)
        else:
            w = ColumnWriter(Path(f"{prefix}.npy"), info.dtype, trailing_shape)
        self._open.append(w)
        return w

    def write_column(
        self, table: str, column: str, values: np.ndarray, info: ColumnInfo | None = None
    ) -> None:
        arr = np.asarray(values)
        info = info or ColumnInfo(dtype=str(arr.dtype))
        if arr.ndim == 2 and info.width is None:
            info.width = arr.shape[1]
        w = self.column_writer(table, column, info, tuple(arr.shape[1:]))
        assert isinstance(w, ColumnWriter)
        w.append(arr)
        w.close()
        self._set_rows(table, w.rows)

    def write_jagged(
        self, table: str, column: str, values: np.ndarray, lengths: np.ndarray, info: ColumnInfo
    ) -> None:
        info.jagged = True
        w = self.column_writer(table, column, info)
        assert isinstance(w, JaggedColumnWriter)
        w.append(values, lengths)
        w.close()
        self._set_rows(table, w.rows)

    def _set_rows(self, table: str, rows: int) -> None:
        t = self.tables[table]
        if t.rows and t.rows != rows:
            raise ValueError(f"table {table!r}: column has {rows} rows, others have {t.rows}")
        t.rows = rows

    def write_idmap(self, name: str, raw_ids: np.ndarray) -> None:
        """``raw_ids[i]`` is the raw id of index ``i + 1`` (index 0 is the OOV bucket)."""
        raw = np.asarray(raw_ids)
        if raw.dtype == object:
            raw = raw.astype(str)
        path = self.tmp / "idmaps" / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, raw, allow_pickle=False)
        self.idmaps[name] = f"idmaps/{name}.npy"

    # -- commit ----------------------------------------------------------------------------
    def commit(self) -> Path:
        for w in self._open:
            w.close()
        for table, info in self.tables.items():
            for column, cinfo in info.columns.items():
                rows = _stored_rows(self.tmp / table, column, cinfo)
                self._set_rows(table, rows)
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": self.source,
            "counts": self.counts,
            "tables": {k: t.to_json() for k, t in self.tables.items()},
            "idmaps": self.idmaps,
            **self.meta_extra,
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        for w in self._open:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - cleanup must not mask the original error
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _stored_rows(table_dir: Path, column: str, info: ColumnInfo) -> int:
    if info.jagged:
        return int(np.load(table_dir / f"{column}.offsets.npy", mmap_mode="r").shape[0]) - 1
    return int(np.load(table_dir / f"{column}.npy", mmap_mode="r").shape[0])


@dataclass
class Jagged:
    """A memory-mapped jagged column."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values and lengths of ``rows`` (in that order)."""
        starts = self.offsets[rows]
        lengths = self.offsets[np.asarray(rows) + 1] - starts
        if len(rows) == 0:
            return np.zeros(0, dtype=self.values.dtype), lengths
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(
            int(lengths.sum())
        )
        return np.asarray(self.values[idx]), lengths


class PreparedDataset:
    """Read-only view of a prepared dataset; arrays are memory-mapped, never parsed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path}: not a prepared dataset (no meta.json); run `funnel data prepare`"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {version}, this funnel reads {FORMAT_VERSION}")
        self.tables = {k: TableInfo.from_json(v) for k, v in self.meta["tables"].items()}

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def counts(self) -> dict[str, int]:
        return self.meta.get("counts", {})

    def has_table(self, table: str) -> bool:
        return table in self.tables

    def info(self, table: str, column: str) -> ColumnInfo:
        try:
            return self.tables[table].columns[column]
        except KeyError:
            raise KeyError(
                f"{self.path}: no column {table}.{column}; has "
                f"{ {t: sorted(i.columns) for t, i in self.tables.items()} }"
            ) from None

    def column(self, table: str, column: str) -> np.ndarray:
        info = self.info(table, column)
        if info.jagged:
            raise TypeError(f"{table}.{column} is jagged; use jagged()")
        return np.load(self.path / table / f"{column}.npy", mmap_mode="r")

    def jagged(self, table: str, column: str) -> Jagged:
        info = self.info(table, column)
        if not info.jagged:
            raise TypeError(f"{table}.{column} is not jagged; use column()")
        base = self.path / table
        return Jagged(
            values=np.load(base / f"{column}.values.npy", mmap_mode="r"),
            offsets=np.load(base / f"{column}.offsets.npy", mmap_mode="r"),
        )

    def idmap(self, name: str) -> np.ndarray:
        """Raw ids: ``idmap(name)[i - 1]`` is the raw id of index ``i``."""
        rel = self.meta["idmaps"].get(name)
        if rel is None:
            raise KeyError(f"{self.path}: no id map {name!r} (hashed field?)")
        return np.load(self.path / rel, allow_pickle=False)

    def split_rows(self, table: str, split: str) -> np.ndarray:
        codes = self.column(table, "split")
        return np.flatnonzero(np.asarray(codes) == SPLIT_CODES[split])

    def iter_columns(self, table: str) -> Iterator[tuple[str, ColumnInfo]]:
        yield from self.tables[table].columns.items()


def dataset_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over a prepared dataset's meta.json and the names and sizes of its files."""
    root = Path(path)
    h = hashlib.sha256((root / "meta.json").read_bytes())
    for p in sorted(root.rglob("*.npy")):
        h.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Write ``path`` through a temporary sibling and rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
