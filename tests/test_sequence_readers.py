"""SASRec 'user item' and one-line-per-user readers, their bad input, and prepared sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.errors import BadRows, DataError
from data.prepare import prepare_sasrec, prepare_user_items
from data.sequences import read_sasrec, read_user_items
from data.shards import SPLIT_CODES, PreparedDataset

SASREC = "1 10\n1 11\n1 12\n2 11\n2 10\n3 12\n1 13\n"


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_read_sasrec(tmp_path):
    raw = read_sasrec(write(tmp_path / "Toy.txt", SASREC))
    t = raw.interactions
    assert t.column_names == ["user_id", "item_id", "timestamp"]
    assert t["user_id"].to_pylist() == [1, 1, 1, 2, 2, 3, 1]
    assert t["timestamp"].to_pylist() == list(range(7))  # position = time


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        ("1 10\n0 11\n", 2, "user_id", "non-positive id 0 (SASRec ids are 1-based)"),
        ("1 10\n1 x\n", 2, "item_id", "not an integer: 'x'"),
        ("1 10\n1 11 5\n", 2, None, "wrong number of fields: 3, expected 2"),
        ("1 10\n\n1 -4\n", 3, "item_id", "non-positive id -4"),
    ],
)
def test_sasrec_bad_rows(tmp_path, text, line, field, message):
    with pytest.raises(DataError) as e:
        read_sasrec(write(tmp_path / "Toy.txt", text))
    assert (Path(e.value.path).name, e.value.line, e.value.field) == ("Toy.txt", line, field)
    assert message in str(e.value)


def test_sasrec_empty_file(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_sasrec(write(tmp_path / "Toy.txt", "\n"))


def test_sasrec_skip_bad_rows(tmp_path):
    rows = BadRows(skip=True)
    raw = read_sasrec(write(tmp_path / "Toy.txt", "1 10\n1 x\n2 3 4\n2 5\n"), bad_rows=rows)
    assert raw.interactions.num_rows == 2 and rows.count == 2


def test_prepare_sasrec_sequences_follow_file_order(tmp_path):
    result = prepare_sasrec(write(tmp_path / "Toy.txt", SASREC), tmp_path / "out")
    ds = PreparedDataset(tmp_path / "out")
    assert result.counts == {**result.counts, "interactions": 7, "users": 3, "items": 4}
    seq = ds.jagged("sequences", "items")
    item_raw = ds.idmap("item")
    assert [item_raw[seq.row(r) - 1].tolist() for r in range(3)] == [[10, 11, 12, 13], [11, 10], [12]]
    split = np.asarray(ds.column("interactions", "split"))
    assert split.tolist()[:4] == [0, 0, SPLIT_CODES["val"], SPLIT_CODES["test"]]
    assert not ds.has_table("ctr")  # implicit feedback: no labels


USER_ITEMS = b"0 5 3 9\r\n1 3\r\n2\r\n"


def test_read_user_items_crlf_zero_based(tmp_path):
    raw = read_user_items(write(tmp_path / "train.txt", USER_ITEMS))
    t = raw.interactions
    assert t["user_id"].to_pylist() == [0, 0, 0, 1]
    assert t["item_id"].to_pylist() == [5, 3, 9, 3]
    assert raw.users["user_id"].to_pylist() == [0, 1, 2]  # user 2 has no items but is known
    assert "split" not in t.column_names


def test_read_user_items_with_test_file(tmp_path):
    train = write(tmp_path / "train.txt", USER_ITEMS)
    test = write(tmp_path / "test.txt", b"0 7\n3 1\n")
    raw = read_user_items(train, test_path=test)
    t = raw.interactions
    assert t["split"].to_pylist() == [0, 0, 0, 0, 2, 2]
    assert t["timestamp"].to_pylist() == list(range(6))
    result = prepare_user_items(train, tmp_path / "out", test_path=test)
    assert result.splits["interactions"] == {"kind": "given", "train": 4, "val": 0, "test": 2}
    assert result.counts["users"] == 4 and result.counts["items"] == 5


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        (b"0 1 2\n1 2 x\n", 2, "item 2", "not an integer: 'x'"),
        (b"0 1 2\n1 -2\n", 2, "item 1", "id -2 out of range"),
        (b"0 1 2\n0 3\n", 2, "user", "duplicate user 0 (first on line 1)"),
    ],
)
def test_user_items_bad_rows(tmp_path, text, line, field, message):
    with pytest.raises(DataError) as e:
        read_user_items(write(tmp_path / "train.txt", text))
    assert (e.value.line, e.value.field) == (line, field) and "train.txt" in str(e.value)
    assert message in str(e.value)


def test_user_items_one_based_rejects_zero(tmp_path):
    with pytest.raises(DataError, match="ids are 1-based"):
        read_user_items(write(tmp_path / "train.txt", b"1 0\n"), one_based=True)


@pytest.mark.shared_data
def test_real_video(shared_data, tmp_path):
    raw = read_sasrec(shared_data / "sasrec_video" / "Video.txt")
    t = raw.interactions
    assert t.num_rows == 287_107
    users, items = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    assert len(np.unique(users)) == 31_013 and users.max() == 31_013
    assert len(np.unique(items)) == 23_715 and items.max() == 23_715
    result = prepare_sasrec(shared_data / "sasrec_video" / "Video.txt", tmp_path / "video")
    assert "interactions 287,107  users 31,013  items 23,715" in result.report()
    ds = PreparedDataset(tmp_path / "video")
    assert np.array_equal(ds.idmap("item"), np.arange(1, 23_716))  # 1-based contiguous: index == raw id
    seq = ds.jagged("sequences", "items")
    assert seq.row(0)[:3].tolist() == [6393, 13504, 14087]  # user 1's first lines, in file order


@pytest.mark.shared_data
def test_real_ultragcn(shared_data):
    d = shared_data / "movielens-1m-ultragcn"
    train = read_user_items(d / "train.txt").interactions
    assert train.num_rows == 796_244
    assert len(np.unique(train["user_id"].to_numpy())) == 6_022
    assert len(np.unique(train["item_id"].to_numpy())) == 3_043
    both = read_user_items(d / "train.txt", test_path=d / "test.txt").interactions
    assert (both["split"].to_numpy() == SPLIT_CODES["test"]).sum() == 99_455
