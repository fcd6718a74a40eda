"""Readers for implicit-feedback sequence files (no ratings, no timestamps).

* SASRec ``user item`` text: one interaction per line, space-separated, 1-based ids, each user's
  lines in chronological order (``Video.txt``, ``ml-1m.txt`` of SASRec/BERT4Rec).
* One line per user, ``user item1 item2 ...`` (LightGCN/UltraGCN ``train.txt``/``test.txt``),
  whitespace-separated, 0-based ids, possibly CRLF line ends.

Neither format has times, so ``timestamp`` is the interaction's position in the input (0, 1, 2, ...
over the whole file, test file after train file): a user's interactions keep their file order
under every stable sort, which is all that leave-one-out and sequence models need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from data.errors import BadRows, DataError
from data.shards import SPLIT_CODES
from data.tabular import Field, RawTables, read_bytes, read_delimited, reject_non_positive


def read_sasrec(path: Path, *, bad_rows: BadRows | None = None) -> RawTables:
    """SASRec ``user item`` lines -> interactions (user_id, item_id, timestamp = line order)."""
    path = Path(path)
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    parsed = read_delimited(
        path, [Field("user_id", "int"), Field("item_id", "int")], sep=" ", bad_rows=bad_rows
    )
    parsed = reject_non_positive(parsed, ["user_id", "item_id"], bad_rows, "SASRec ids are 1-based")
    if len(parsed) == 0:
        raise DataError(path, None, None, "no valid interactions")
    n = len(parsed)
    interactions = pa.table(
        {
            "user_id": parsed.table["user_id"],
            "item_id": parsed.table["item_id"],
            "timestamp": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    return RawTables(
        name=f"sasrec:{path.stem}",
        interactions=interactions,
        source={"format": "sasrec", "path": str(path)},
        bad_rows=bad_rows,
    )


def _parse_user_items(path: Path, bad_rows: BadRows, min_id: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(users, items, users_without_items)`` of one adjacency file, in file order."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    why = "ids are 1-based" if min_id == 1 else "ids are non-negative"
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    lonely: list[int] = []
    text = read_bytes(path)
    if not text.strip():
        raise DataError(path, None, None, "empty file (no data rows)")
    local: dict[int, int] = {}
    for lineno, raw in enumerate(text.split(b"\n"), start=1):
        tokens = raw.split()
        if not tokens:
            continue
        try:
            ids = np.array(tokens, dtype=np.int64)
        except (ValueError, OverflowError):
            k = next((k for k, t in enumerate(tokens) if not t.lstrip(b"-").isdigit() or len(t) > 18), 0)
            name = "user" if k == 0 else f"item {k}"
            bad_rows.handle(
                DataError(path, lineno, name, f"not an integer: {tokens[k].decode(errors='replace')!r}")
            )
            continue
        low = np.flatnonzero(ids < min_id)
        if len(low):
            k = int(low[0])
            name = "user" if k == 0 else f"item {k}"
            bad_rows.handle(DataError(path, lineno, name, f"id {ids[k]} out of range ({why})"))
            continue
        user = int(ids[0])
        if user in local:
            bad_rows.handle(
                DataError(path, lineno, "user", f"duplicate user {user} (first on line {local[user]})")
            )
            continue
        local[user] = lineno
        if len(ids) == 1:
            lonely.append(user)
            continue
        users.append(np.full(len(ids) - 1, user, dtype=np.int64))
        items.append(ids[1:])
    cat = np.concatenate if users else (lambda _: np.zeros(0, dtype=np.int64))
    return cat(users), cat(items), lonely


def read_user_items(
    path: Path, *, test_path: Path | None = None, one_based: bool = False, bad_rows: BadRows | None = None
) -> RawTables:
    """One-line-per-user adjacency lists -> interactions.

    With ``test_path`` (the same format) the split comes with the data: rows from ``path`` are
    train, rows from ``test_path`` test, and the ``split`` column carries that. Users listed with
    no items are still known users (``users`` table with only ``user_id``).
    """
    path = Path(path)
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    min_id = 1 if one_based else 0
    users, items, lonely = _parse_user_items(path, bad_rows, min_id)
    columns = {"user_id": users, "item_id": items}
    split = np.full(len(users), SPLIT_CODES["train"], dtype=np.uint8)
    source: dict[str, object] = {"format": "user-items", "path": str(path)}
    if test_path is not None:
        t_users, t_items, _ = _parse_user_items(Path(test_path), bad_rows, min_id)
        columns = {"user_id": np.r_[users, t_users], "item_id": np.r_[items, t_items]}
        split = np.r_[split, np.full(len(t_users), SPLIT_CODES["test"], dtype=np.uint8)]
        source["test_path"] = str(test_path)
    n = len(columns["user_id"])
    if n == 0:
        raise DataError(path, None, None, "no interactions")
    interactions = pa.table(
        {
            "user_id": pa.array(columns["user_id"]),
            "item_id": pa.array(columns["item_id"]),
            "timestamp": pa.array(np.arange(n, dtype=np.int64)),
            **({"split": pa.array(split)} if test_path is not None else {}),
        }
    )
    known_users = np.unique(np.r_[columns["user_id"], np.asarray(lonely, dtype=np.int64)])
    return RawTables(
        name=f"user-items:{path.stem}",
        interactions=interactions,
        users=pa.table({"user_id": pa.array(known_users)}),
        source=source,
        bad_rows=bad_rows,
    )
