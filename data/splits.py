"""Train/validation/test split assignment (pure numpy, no I/O).

Every function returns one ``uint8`` code per row (``data.shards.SPLIT_CODES``: 0 train, 1 val,
2 test) in the rows' original order, so callers can store the codes next to the data without
reordering anything.

* :func:`leave_one_out`: the protocol of SASRec/BERT4Rec/NCF evaluation, per user.
* :func:`temporal_split`: global time cut-offs (no future information leaks into training).
* :func:`random_split`: a seeded, *counter-based* draw. A row's split depends only on its global row
  number and the seed, not on how the rows were chunked, so a streamed 1 TB file and the same rows
  held in memory get identical splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.shards import SPLIT_CODES

TRAIN, VAL, TEST = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_KINDS = ("loo", "temporal", "random")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(train, val, test)`` fractions: three non-negative numbers adding up to 1."""
    if len(fractions) != 3:
        raise ValueError(f"split fractions need 3 values (train, val, test), got {list(fractions)}")
    f = tuple(float(x) for x in fractions)
    if min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and add up to 1, got {list(fractions)}")
    return f[0], f[1], f[2]


def time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Row order sorted by user, then time; ties keep their input order (stable).

    Stability matters for formats whose "timestamp" is a position or has coarse resolution:
    equal times must not reshuffle a user's history.
    """
    by_time = np.argsort(np.asarray(timestamp), kind="stable")
    return by_time[np.argsort(np.asarray(user)[by_time], kind="stable")]


def leave_one_out(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Per user: last interaction by time = test, second-to-last = val, the rest train.

    Users with fewer than 3 interactions go entirely to train: holding out one of two items
    would leave nothing (or a single item) to learn that user from.
    """
    user = np.asarray(user)
    n = len(user)
    codes = np.full(n, TRAIN, dtype=np.uint8)
    if n == 0:
        return codes
    order = time_order(user, timestamp)
    sorted_user = user[order]
    starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
    ends = np.r_[starts[1:], n]  # exclusive
    long_enough = (ends - starts) >= 3
    codes[order[ends[long_enough] - 1]] = TEST
    codes[order[ends[long_enough] - 2]] = VAL
    return codes


def temporal_split(timestamp: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """The earliest ``fractions[0]`` of rows (stable by time) train, the next val, the latest test.

    Cut by row position in time order rather than by timestamp value so the fractions are exact
    even when many rows share a timestamp (ties are broken by input order).
    """
    f_train, f_val, _ = check_fractions(fractions)
    ts = np.asarray(timestamp)
    n = len(ts)
    n_train = int(round(f_train * n))
    n_val = min(int(round(f_val * n)), n - n_train)
    order = np.argsort(ts, kind="stable")
    codes = np.full(n, TEST, dtype=np.uint8)
    codes[order[:n_train]] = TRAIN
    codes[order[n_train : n_train + n_val]] = VAL
    return codes


def positional_split(
    n: int, total: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, offset: int = 0
) -> np.ndarray:
    """:func:`temporal_split` for rows already in time order, chunk by chunk.

    Rows ``offset .. offset + n`` of ``total`` rows; used for streamed files (Criteo days) whose
    row order is their time order and which cannot be sorted in memory.
    """
    f_train, f_val, _ = check_fractions(fractions)
    n_train = int(round(f_train * total))
    n_val = min(int(round(f_val * total)), total - n_train)
    pos = np.arange(offset, offset + n, dtype=np.int64)
    codes = np.full(n, TEST, dtype=np.uint8)
    codes[pos < n_train + n_val] = VAL
    codes[pos < n_train] = TRAIN
    return codes


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a cheap, well-mixed bijection on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def random_split(
    n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0, offset: int = 0
) -> np.ndarray:
    """Seeded random split of rows ``offset .. offset + n``.

    Each row draws ``u = hash(seed, row) / 2**64`` independently, so the split of a row does not
    depend on chunk boundaries (streaming) and fractions hold in expectation, not exactly.
    """
    f_train, f_val, _ = check_fractions(fractions)
    rows = np.arange(offset, offset + n, dtype=np.uint64)
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    u = (_splitmix64(rows ^ key) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    codes = np.full(n, TEST, dtype=np.uint8)
    codes[u < f_train + f_val] = VAL
    codes[u < f_train] = TRAIN
    return codes


def make_split(
    kind: str,
    user: np.ndarray,
    timestamp: np.ndarray,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> np.ndarray:
    """Dispatch on a CLI split name: ``loo`` (leave-one-out), ``temporal`` or ``random``."""
    if kind == "loo":
        return leave_one_out(user, timestamp)
    if kind == "temporal":
        return temporal_split(timestamp, fractions)
    if kind == "random":
        return random_split(len(user), fractions, seed)
    raise ValueError(f"unknown split {kind!r}; expected one of {SPLIT_KINDS}")


def split_counts(codes: np.ndarray) -> dict[str, int]:
    """Rows per split name, for reports and ``meta.json``."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=3)
    return {name: int(counts[code]) for name, code in SPLIT_CODES.items()}
