"""data.splits: leave-one-out, temporal and seeded random split codes."""

from __future__ import annotations

import numpy as np
import pytest

from data.splits import (
    TEST,
    TRAIN,
    VAL,
    check_fractions,
    leave_one_out,
    make_split,
    positional_split,
    random_split,
    split_counts,
    temporal_split,
    time_order,
)


def test_time_order_is_stable_for_ties():
    user = np.array([2, 1, 2, 1, 1])
    ts = np.array([5, 3, 5, 3, 1])
    # user 1: rows 4 (t=1), then rows 1 and 3 (t=3, input order); user 2: rows 0 and 2 (t=5)
    assert time_order(user, ts).tolist() == [4, 1, 3, 0, 2]


def test_leave_one_out_per_user_by_time():
    user = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3])
    ts = np.array([100, 90, 120, 80, 50, 60, 55, 10, 11])
    codes = leave_one_out(user, ts)
    # user 1: t=120 test, t=100 val; user 2: t=60 test, t=55 val; user 3 (< 3 events): all train
    assert codes.tolist() == [VAL, TRAIN, TEST, TRAIN, TRAIN, TEST, VAL, TRAIN, TRAIN]
    assert codes.dtype == np.uint8


def test_leave_one_out_ties_keep_input_order():
    codes = leave_one_out(np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64))
    assert codes.tolist() == [TRAIN, TRAIN, VAL, TEST]


def test_leave_one_out_empty():
    assert len(leave_one_out(np.zeros(0), np.zeros(0))) == 0


def test_temporal_split_exact_fractions():
    ts = np.array([9, 0, 8, 1, 7, 2, 6, 3, 5, 4])
    codes = temporal_split(ts, (0.6, 0.2, 0.2))
    assert split_counts(codes) == {"train": 6, "val": 2, "test": 2}
    assert set(ts[codes == TRAIN]) == {0, 1, 2, 3, 4, 5}
    assert set(ts[codes == TEST]) == {8, 9}


def test_positional_split_matches_temporal_in_chunks():
    n = 1003
    whole = temporal_split(np.arange(n))
    parts = [positional_split(min(100, n - o), n, offset=o) for o in range(0, n, 100)]
    assert np.array_equal(np.concatenate(parts), whole)


def test_random_split_deterministic_and_chunk_independent():
    n = 20_000
    whole = random_split(n, seed=7)
    assert np.array_equal(whole, random_split(n, seed=7))
    chunks = np.concatenate([random_split(min(777, n - o), seed=7, offset=o) for o in range(0, n, 777)])
    assert np.array_equal(whole, chunks)
    assert not np.array_equal(whole, random_split(n, seed=8))
    c = split_counts(whole)
    assert abs(c["train"] / n - 0.8) < 0.02 and abs(c["val"] / n - 0.1) < 0.02


def test_make_split_dispatch_and_errors():
    user, ts = np.array([1, 1, 1]), np.array([1, 2, 3])
    assert make_split("loo", user, ts).tolist() == [TRAIN, VAL, TEST]
    assert len(make_split("random", user, ts, seed=1)) == 3
    with pytest.raises(ValueError, match="unknown split"):
        make_split("kfold", user, ts)
    with pytest.raises(ValueError, match="add up to 1"):
        check_fractions((0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="3 values"):
        check_fractions((0.5, 0.5))
