"""Delimited-text and Parquet parsing shared by every reader, and the generic interactions reader.

Every reader in ``data/`` (MovieLens, SASRec, Criteo, generic CSV/Parquet) goes through
:func:`parse_block`, so there is one place that decides what a malformed row is and how it is
reported. Parsing is two-tier:

* **Fast path:** pyarrow's C++ CSV parser reads every field as a string, then whole columns are cast
  (``pyarrow.compute.cast``) and validated with vectorised masks. Line numbers are reconstructed as
  ``first line + row`` because blocks with blank lines are sent to the slow path.
* **Slow path**, taken only when pyarrow rejects a block's structure (wrong field count, bad
  encoding) or the block has blank lines: a plain Python line loop that knows the exact line of
  every field. A cast that fails is re-checked value by value on that column only.

Either way a malformed row becomes a :class:`data.errors.DataError` naming the file, the 1-based
line and the field, handed to a :class:`data.errors.BadRows` policy (raise, or skip and count).
Blank lines are not rows and are ignored.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.errors import BadRows, DataError

Kind = Literal["str", "int", "float", "hex", "time"]

_INT_RE = re.compile(r"-?[0-9]+")
_FLOAT_RE = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)", re.I
)
_ISO_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[ T][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?)?")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FAST_SEP = "\x1f"  # stands in for multi-character separators ("::") that pyarrow cannot split on

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
HEX_DIGITS = 8


@dataclass(frozen=True)
class Field:
    """One input column: its name (used in error messages), how to convert it, and if it may be empty.

    Kinds: ``str``; ``int`` (int64); ``float`` (float64); ``hex`` (exactly 8 hex digits -> int64, the
    Criteo categoricals); ``time`` (integer epoch seconds or naive ISO-8601 -> int64 seconds).
    Empty optional fields become nulls.
    """

    name: str
    kind: Kind = "str"
    required: bool = True


@dataclass
class RawTables:
    """What a reader returns: interactions plus optional side-feature tables, all with raw ids.

    ``interactions`` has ``user_id``, ``item_id`` and optionally ``timestamp`` (int64), ``rating``
    (float32), ``label`` (float32) and ``split`` (uint8, a split that came with the data). ``users``
    and ``items`` are keyed by ``user_id`` / ``item_id``; when present they define the known ids.
    The last three fields tell :mod:`data.prepare` how to treat side columns: integer columns listed
    in ``categorical`` are index-mapped rather than used as numbers, ``text`` columns (titles) are
    stored as lookup arrays rather than features, and ``notes`` describe derived columns for the
    ``feature_spec`` in ``meta.json``.
    """

    name: str
    interactions: pa.Table
    users: pa.Table | None = None
    items: pa.Table | None = None
    source: dict[str, Any] = field(default_factory=dict)
    bad_rows: BadRows = field(default_factory=BadRows)
    categorical: frozenset[str] = frozenset()
    text: frozenset[str] = frozenset()
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Parsed:
    """A parsed table and, for every row, the 1-based line (or row) of the input it came from."""

    path: Path
    table: pa.Table
    lines: np.ndarray

    def __len__(self) -> int:
        return self.table.num_rows

    def numpy(self, name: str) -> np.ndarray:
        """A column as numpy (strings as ``str``); nulls must have been filled or rejected before."""
        return to_numpy(self.table[name])

    def reject(
        self, mask: np.ndarray, field_name: str | None, message: Callable[[int], str], bad_rows: BadRows
    ) -> Parsed:
        """Report rows where ``mask`` is true (``message(i)`` says what is wrong with row ``i``).

        With the default policy the first one raises; with ``--skip-bad-rows`` each is counted and
        the rest of the table is returned without them.
        """
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return self
        for i in np.flatnonzero(mask):
            bad_rows.handle(DataError(self.path, int(self.lines[i]), field_name, message(int(i))))
        keep = ~mask
        return Parsed(self.path, self.table.filter(pa.array(keep)), self.lines[keep])


def to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow column -> numpy; string columns become fixed-width ``str`` arrays (sortable, searchable)."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)
    return col.to_numpy() if isinstance(col, pa.ChunkedArray) else col.to_numpy(zero_copy_only=False)


# -- raw bytes -----------------------------------------------------------------------------


def open_binary(path: Path) -> BinaryIO:
    """Open a file for reading bytes; ``.gz`` files are decompressed on the fly."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - caller closes


def read_bytes(path: Path) -> bytes:
    with open_binary(path) as f:
        return f.read()


def iter_line_blocks(path: Path, block_bytes: int = 64 << 20) -> Iterator[tuple[bytes, int]]:
    """``(block, first_line)`` pairs of whole lines, about ``block_bytes`` each.

    This is how files larger than memory are read: only one block is held at a time and the
    1-based number of its first line is tracked so errors can still name the exact line. The last
    line may lack a newline.
    """
    line = 1
    rest = b""
    with open_binary(path) as f:
        while True:
            buf = f.read(block_bytes)
            if not buf:
                break
            data = rest + buf if rest else buf
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            block, rest = data[: cut + 1], data[cut + 1 :]
            yield block, line
            line += block.count(b"\n")
    if rest:
        yield rest, line


# -- parsing -------------------------------------------------------------------------------


def _split_line(text: str, sep: str, quoting: bool) -> list[str]:
    if quoting:
        return next(csv.reader([text], delimiter=sep))
    return text.split(sep)


def _arrow_type(kind: Kind) -> pa.DataType:
    # hex fields stay bytes: no UTF-8 validation, and the decoder works on the raw buffer
    return pa.binary() if kind == "hex" else pa.string()


def _fast_split(
    data: bytes,
    first_line: int,
    fields: Sequence[Field],
    sep: str,
    header: bool,
    encoding: str,
    quoting: bool,
) -> Parsed | None:
    """pyarrow's parser on a whole block; None when the slow path must decide.

    pyarrow skips blank lines, so a block with any is caught by the row count differing from the
    line count and goes to the slow path: a successful parse has one row per line, which is what
    makes ``first_line + row`` the right line number. The block is never copied unless a
    multi-character separator has to be rewritten.
    """
    names: list[str]
    skip = 0
    if header:
        head_end = data.find(b"\n")
        head = (data if head_end < 0 else data[:head_end]).rstrip(b"\r")
        names = _split_line(head.decode(encoding, errors="replace"), sep, quoting)
        skip = 1
    else:
        names = [f.name for f in fields]
    if any(f.name not in names for f in fields):
        return None
    delimiter = sep
    if len(sep) > 1:
        data = data.replace(sep.encode(encoding), _FAST_SEP.encode())
        delimiter = _FAST_SEP
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip, encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False),
            convert_options=pacsv.ConvertOptions(
                include_columns=[f.name for f in fields],
                column_types={f.name: _arrow_type(f.kind) for f in fields},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError, LookupError):
        return None
    lines = data.count(b"\n") + (not data.endswith(b"\n")) - skip
    if table.num_rows != lines:  # blank lines or bare-CR line ends: let the slow path count
        return None
    return Parsed(Path(), table, first_line + skip + np.arange(table.num_rows, dtype=np.int64))


def _slow_split(
    body: bytes,
    first_line: int,
    path: Path,
    fields: Sequence[Field],
    sep: str,
    header: bool,
    encoding: str,
    quoting: bool,
    bad_rows: BadRows,
) -> Parsed:
    """Line-by-line split that pins every structural problem to its line."""
    positions: list[int] | None = None if header else list(range(len(fields)))
    expected = len(fields)
    columns: list[list[str]] = [[] for _ in fields]
    lines: list[int] = []
    for k, raw in enumerate(body.split(b"\n")):
        lineno = first_line + k
        raw = raw.rstrip(b"\r")
        if not raw.strip(b" "):  # blank (tabs are separators: a line of tabs is a row)
            continue
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            bad_rows.handle(DataError(path, lineno, None, f"not valid {encoding} text ({e.reason})"))
            continue
        parts = _split_line(text, sep, quoting)
        if positions is None:
            missing = [f.name for f in fields if f.name not in parts]
            if missing:
                raise DataError(path, lineno, missing[0], f"no such column in the header {parts}")
            positions = [parts.index(f.name) for f in fields]
            expected = len(parts)
            continue
        if len(parts) != expected:
            bad_rows.handle(
                DataError(path, lineno, None, f"wrong number of fields: {len(parts)}, expected {expected}")
            )
            continue
        for col, pos in zip(columns, positions, strict=True):
            col.append(parts[pos])
        lines.append(lineno)
    if positions is None:
        raise DataError(path, first_line, None, "no header line")
    table = pa.table(
        {
            f.name: pa.array(col, pa.string()).cast(_arrow_type(f.kind))
            for f, col in zip(fields, columns, strict=True)
        }
    )
    return Parsed(path, table, np.asarray(lines, dtype=np.int64))


def parse_block(
    data: bytes,
    first_line: int,
    path: Path,
    fields: Sequence[Field],
    *,
    sep: str,
    header: bool = False,
    encoding: str = "utf-8",
    quoting: bool = False,
    bad_rows: BadRows,
) -> Parsed:
    """Parse and convert one block of delimited text (see the module docstring).

    Without ``header`` the fields are positional and every line must have exactly
    ``len(fields)`` fields; with it the first line names the columns and ``fields`` picks them by
    name.
    """
    path = Path(path)
    parsed: Parsed | None = None
    if data and not data.isspace():
        parsed = _fast_split(data, first_line, fields, sep, header, encoding, quoting)
    if parsed is None:
        parsed = _slow_split(data, first_line, path, fields, sep, header, encoding, quoting, bad_rows)
    parsed = Parsed(path, parsed.table, parsed.lines)
    for f in fields:
        parsed = convert(parsed, f, bad_rows)
    return parsed


def read_delimited(
    path: Path,
    fields: Sequence[Field],
    *,
    sep: str,
    header: bool = False,
    encoding: str = "utf-8",
    quoting: bool = False,
    bad_rows: BadRows,
) -> Parsed:
    """Parse a whole (small enough) delimited file; an empty file is an error, not an empty table."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    parsed = parse_block(
        read_bytes(path),
        1,
        path,
        fields,
        sep=sep,
        header=header,
        encoding=encoding,
        quoting=quoting,
        bad_rows=bad_rows,
    )
    if len(parsed) == 0:
        raise DataError(path, None, None, "empty file (no data rows)")
    return parsed


# -- conversion ----------------------------------------------------------------------------


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(pc.binary_length(col), 0).to_numpy()


def decode_hex(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """8-hex-digit strings -> ``int(x, 16)`` as int64, vectorised over the raw byte buffer.

    Returns ``(values, bad)``: empty or null fields give -1 (missing); ``bad`` marks fields that
    are not exactly 8 hex digits. In the common case every present value is 8 bytes, so the values
    lie back to back in the Arrow data buffer and are decoded as one ``[k, 8]`` byte matrix.
    """
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    values, bads = [], []
    for arr in chunks:
        arr = arr.cast(pa.binary())
        n = len(arr)
        bufs = arr.buffers()
        offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
        data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
        lengths = np.diff(offsets)
        if arr.null_count:
            lengths = np.where(arr.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
        out = np.full(n, -1, dtype=np.int64)
        bad = (lengths != 0) & (lengths != HEX_DIGITS)
        if not bad.any() and not arr.null_count:
            rows = np.flatnonzero(lengths)
            matrix = data[offsets[0] : offsets[-1]].reshape(-1, HEX_DIGITS)
        else:
            rows = np.flatnonzero(lengths == HEX_DIGITS)
            matrix = data[offsets[rows][:, None] + np.arange(HEX_DIGITS)]
        if len(rows):
            nibbles = _HEX_LUT[matrix]
            not_hex = nibbles.max(axis=1) > 15
            packed = (nibbles[:, 0::2] << 4) | (nibbles[:, 1::2] & 15)  # 4 bytes, big-endian
            decoded = np.ascontiguousarray(packed).view(">u4").ravel().astype(np.int64)
            out[rows] = np.where(not_hex, -1, decoded)
            bad[rows[not_hex]] = True
        values.append(out)
        bads.append(bad)
    if not values:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(values), np.concatenate(bads)


def _valid_int(s: str) -> bool:
    return bool(_INT_RE.fullmatch(s)) and _INT64_MIN <= int(s) <= _INT64_MAX


def _valid_float(s: str) -> bool:
    return bool(_FLOAT_RE.fullmatch(s))


def _valid_time(s: str) -> bool:
    return _valid_int(s) or bool(_ISO_RE.fullmatch(s))


_CHECKS: dict[str, tuple[pa.DataType, Callable[[str], bool], str]] = {
    "int": (pa.int64(), _valid_int, "not an integer"),
    "float": (pa.float64(), _valid_float, "not a number"),
}


def _cast_time(col: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return pc.cast(col, pa.int64())
    except pa.ArrowInvalid:
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())


def _text(value: bytes | str | None) -> str | None:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _empty_to_null(col: pa.ChunkedArray) -> pa.ChunkedArray:
    empty = _lengths(col) == 0
    if not empty.any():
        return col
    return pc.if_else(pa.array(empty), pa.scalar(None, col.type), col)


def convert(parsed: Parsed, f: Field, bad_rows: BadRows) -> Parsed:
    """Convert column ``f.name`` from text to its kind, rejecting rows whose value does not convert."""
    col = parsed.table[f.name]
    if not (pa.types.is_string(col.type) or pa.types.is_binary(col.type)):
        return parsed  # already typed (Parquet)
    if f.kind == "hex":
        values, bad = decode_hex(col)
        if bad.any():
            parsed = parsed.reject(
                bad,
                f.name,
                lambda i: f"not hex (expected {HEX_DIGITS} hex digits): {_text(col[i].as_py())!r}",
                bad_rows,
            )
            values = values[~bad]
        return _replace_column(parsed, f.name, pa.array(values, pa.int64(), mask=values < 0))
    if f.required:
        parsed = parsed.reject(_lengths(col) == 0, f.name, lambda i: "missing value", bad_rows)
    if f.kind == "str":
        return parsed
    if f.kind == "time":
        check, what = _valid_time, "not an integer or ISO-8601 time"
        caster: Callable[[pa.ChunkedArray], pa.ChunkedArray] = _cast_time
    else:
        typ, check, what = _CHECKS[f.kind]

        def caster(c: pa.ChunkedArray) -> pa.ChunkedArray:
            return pc.cast(c, typ)

    texts = _empty_to_null(parsed.table[f.name])
    try:
        converted = caster(texts)
    except pa.ArrowInvalid as e:
        values = texts.to_pylist()
        bad = np.fromiter((s is not None and not check(s) for s in values), dtype=bool, count=len(values))
        if not bad.any():  # the line check accepts what pyarrow refused: report pyarrow's reason
            raise DataError(parsed.path, None, f.name, f"{what}: {e}") from None
        parsed = parsed.reject(bad, f.name, lambda i: f"{what}: {values[i]!r}", bad_rows)
        converted = caster(_empty_to_null(parsed.table[f.name]))
    return _replace_column(parsed, f.name, converted)


def _replace_column(parsed: Parsed, name: str, values: pa.Array | pa.ChunkedArray) -> Parsed:
    idx = parsed.table.column_names.index(name)
    return replace(parsed, table=parsed.table.set_column(idx, name, values))


# -- checks shared by readers -----------------------------------------------------------------


def reject_duplicates(parsed: Parsed, name: str, bad_rows: BadRows, what: str = "id") -> Parsed:
    """Reject repeated keys (every repeat after the first), naming the line of the first."""
    values = parsed.numpy(name)
    _, first = np.unique(values, return_index=True)
    dup = np.ones(len(values), dtype=bool)
    dup[first] = False
    if not dup.any():
        return parsed
    first_line = {values[i]: int(parsed.lines[i]) for i in first}
    return parsed.reject(
        dup,
        name,
        lambda i: f"duplicate {what} {values[i].item()!r} (first on line {first_line[values[i]]})",
        bad_rows,
    )


def reject_unknown(parsed: Parsed, name: str, known: np.ndarray, bad_rows: BadRows, where: str) -> Parsed:
    """Reject references to ids missing from a side file (``where`` names that file)."""
    values = parsed.numpy(name)
    unknown = ~np.isin(values, known)
    return parsed.reject(
        unknown, name, lambda i: f"unknown id {values[i].item()!r} (not in {where})", bad_rows
    )


def reject_non_positive(parsed: Parsed, names: Sequence[str], bad_rows: BadRows, why: str) -> Parsed:
    """Reject ids < 1 for formats whose ids are 1-based (``why`` names the format)."""
    for name in names:
        values = parsed.numpy(name)
        parsed = parsed.reject(
            values < 1, name, lambda i, v=values: f"non-positive id {v[i]} ({why})", bad_rows
        )
    return parsed


# -- generic CSV / Parquet interactions ---------------------------------------------------------


def read_tabular(
    path: Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str | None = None,
    rating_col: str | None = None,
    label_col: str | None = None,
    sep: str = ",",
    bad_rows: BadRows | None = None,
) -> RawTables:
    """Interactions from a CSV (with header) or Parquet file with caller-named columns.

    User and item ids stay integers when every value is an integer, strings otherwise. Times may be
    integers (epoch seconds) or ISO-8601. For Parquet the "line" in error messages is the 1-based
    row number.
    """
    path = Path(path)
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    wanted: dict[str, str] = {"user_id": user_col, "item_id": item_col}
    kinds: dict[str, Kind] = {"user_id": "str", "item_id": "str"}
    optional: tuple[tuple[str, str | None, Kind], ...] = (
        ("timestamp", time_col, "time"),
        ("rating", rating_col, "float"),
        ("label", label_col, "float"),
    )
    for out, col, kind in optional:
        if col is not None:
            wanted[out], kinds[out] = col, kind
    if len(set(wanted.values())) != len(wanted):
        raise ValueError(f"the same column is used for two roles: {wanted}")
    fields = [Field(col, kinds[out]) for out, col in wanted.items()]
    if path.suffix in (".parquet", ".pq"):
        parsed = _read_parquet(path, fields, bad_rows)
        for f in fields:
            parsed = convert(parsed, f, bad_rows)
    else:
        parsed = read_delimited(path, fields, sep=sep, header=True, quoting=True, bad_rows=bad_rows)
    for out, what, ok in (
        ("rating", "rating is not finite", np.isfinite),
        ("label", "label must be in [0, 1]", lambda v: (v >= 0) & (v <= 1)),
    ):
        if out in wanted:
            v = np.asarray(pc.cast(parsed.table[wanted[out]], pa.float64()))
            parsed = parsed.reject(~ok(v), wanted[out], lambda i, v=v, w=what: f"{w}: {v[i]}", bad_rows)
    columns: dict[str, pa.ChunkedArray] = {}
    for out, col in wanted.items():
        values = parsed.table[col]
        if out in ("user_id", "item_id"):
            values = _id_column(values)
        elif out == "timestamp":
            if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
                values = pc.cast(values, pa.timestamp("s"))
            values = pc.cast(values, pa.int64())
        else:
            values = pc.cast(values, pa.float32())
        columns[out] = values
    return RawTables(
        name=f"tabular:{path.stem}",
        interactions=pa.table(columns),
        source={"format": "tabular", "path": str(path), "columns": wanted},
        bad_rows=bad_rows,
    )


def _id_column(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Raw ids: int64 when every value is an integer (compact id maps), strings otherwise."""
    if pa.types.is_integer(values.type):
        return pc.cast(values, pa.int64())
    texts = pc.cast(values, pa.string())
    try:
        return pc.cast(texts, pa.int64())
    except pa.ArrowInvalid:
        return texts


def _read_parquet(path: Path, fields: Sequence[Field], bad_rows: BadRows) -> Parsed:
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    schema = pq.read_schema(path)
    for f in fields:
        if f.name not in schema.names:
            raise DataError(path, None, f.name, f"no such column; the file has {schema.names}")
    table = pq.read_table(path, columns=[f.name for f in fields])
    if table.num_rows == 0:
        raise DataError(path, None, None, "empty file (no data rows)")
    parsed = Parsed(path, table, np.arange(1, table.num_rows + 1, dtype=np.int64))
    for f in fields:
        col = parsed.table[f.name]
        if col.null_count:
            parsed = parsed.reject(
                col.is_null().to_numpy(zero_copy_only=False), f.name, lambda i: "missing value", bad_rows
            )
    return parsed
