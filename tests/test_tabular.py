"""The shared delimited-text parser, id maps/hashing, and generic CSV/Parquet interactions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import BadRows, DataError
from data.prepare import IdMap, hash_index, prepare_tabular, stable_hash
from data.shards import PreparedDataset
from data.tabular import Field, decode_hex, parse_block, read_tabular

FIELDS = [
    Field("u", "int"),
    Field("r", "float"),
    Field("c", "hex", required=False),
    Field("s", required=False),
]


def parse(data: bytes, bad_rows: BadRows | None = None, **kw: object):
    return parse_block(data, 1, Path("f.txt"), FIELDS, sep="\t", bad_rows=bad_rows or BadRows(), **kw)  # type: ignore[arg-type]


def test_fast_and_slow_paths_agree():
    clean = b"1\t2.5\t0000000a\tx\n2\t3\t\t\n"
    with_blank = b"1\t2.5\t0000000a\tx\n\n2\t3\t\t\n\n"
    a, b = parse(clean), parse(with_blank)  # blank lines force the line-by-line path
    assert (
        a.table.to_pydict()
        == b.table.to_pydict()
        == {
            "u": [1, 2],
            "r": [2.5, 3.0],
            "c": [10, None],
            "s": ["x", ""],
        }
    )
    assert a.lines.tolist() == [1, 2] and b.lines.tolist() == [1, 3]


def test_crlf_and_missing_final_newline():
    p = parse(b"1\t2\t\t\r\n2\t3\t\t")
    assert p.table["u"].to_pylist() == [1, 2] and p.lines.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("data", "line", "field", "message"),
    [
        (b"1\t2\t\t\n1\tx\t\t\n", 2, "r", "not a number: 'x'"),
        (b"1\t2\t\t\n\n1\t2\t\n", 3, None, "wrong number of fields: 3, expected 4"),
        (b"1\t2\t\t\n 1\t2\t\t\n", 2, "u", "not an integer: ' 1'"),
        (b"1\t2\t\t\n\t2\t\t\n", 2, "u", "missing value"),
        (b"1\t2\t12345678\t\n1\t2\t1234567g\t\n", 2, "c", "not hex"),
        (b"1\t2\t\t\n1\t2\t\xff\xfe\t\n", 2, "c", "not hex"),
        (b"1\t2\t\t\n1\t2\t\t\xff\n", 2, None, "not valid utf-8"),
        (b"99999999999999999999\t1\t\t\n", 1, "u", "not an integer"),
    ],
)
def test_errors_name_line_and_field(data, line, field, message):
    with pytest.raises(DataError) as e:
        parse(data)
    assert (e.value.path, e.value.line, e.value.field) == ("f.txt", line, field)
    assert message in str(e.value) and f"f.txt:{line}" in str(e.value)


def test_skip_counts_every_bad_row():
    rows = BadRows(skip=True)
    p = parse(b"1\t2\t\t\nx\t2\t\t\n3\ty\t\t\n4\t2\t\n5\t2\t\t\n", rows)
    assert p.table["u"].to_pylist() == [1, 5] and p.lines.tolist() == [1, 5]
    assert rows.count == 3


def test_header_and_quoting():
    fields = [Field("b", "int"), Field("a")]
    p = parse_block(
        b'a,b,c\n"x, y",1,z\nw,2,z\n',
        1,
        Path("f.csv"),
        fields,
        sep=",",
        header=True,
        quoting=True,
        bad_rows=BadRows(),
    )
    assert p.table.to_pydict() == {"b": [1, 2], "a": ["x, y", "w"]} and p.lines.tolist() == [2, 3]
    with pytest.raises(DataError, match="no such column") as e:
        parse_block(b"a,c\n1,2\n", 1, Path("f.csv"), fields, sep=",", header=True, bad_rows=BadRows())
    assert e.value.field == "b" and e.value.line == 1


def test_decode_hex():
    values, bad = decode_hex(pa.chunked_array([pa.array([b"0000000f", b"", b"ffffffff"]), pa.array([b"12"])]))
    assert values.tolist() == [15, -1, 0xFFFFFFFF, -1] and bad.tolist() == [False, False, False, True]


def test_idmap_and_hashing():
    m = IdMap.from_values(np.array([30, 10, 20, 10]))
    assert m.raw.tolist() == [10, 20, 30] and m.vocab == 4
    assert m.lookup(np.array([20, 99, 10])).tolist() == [2, 0, 1]
    s = IdMap.from_values(np.array(["b", "a", "b"]), min_count=2)
    assert s.raw.tolist() == ["b"] and s.lookup(np.array(["a", "b"])).tolist() == [0, 1]
    assert IdMap(np.zeros(0, dtype=np.int64)).lookup(np.array([1])).tolist() == [0]
    assert int(stable_hash(np.array(["a"]))[0]) == 0xAF63DC4C8601EC8C  # FNV-1a 64 of "a"
    assert hash_index(np.array([5, 12]), 10).tolist() == [6, 3]
    h = hash_index(np.array(["user-1", "user-2", "user-1"]), 1000)
    assert h[0] == h[2] and 1 <= h.min() and h.max() <= 1000


CSV = (
    "user,item,when,stars,extra\n"
    "alice,i1,2020-01-01 10:00:00,4,x\n"
    "bob,i2,2020-01-02,2,x\n"
    "alice,i3,2020-01-03,3,x\n"
)


def test_read_csv_with_string_ids_and_iso_times(tmp_path):
    p = tmp_path / "events.csv"
    p.write_text(CSV)
    raw = read_tabular(p, user_col="user", item_col="item", time_col="when", rating_col="stars")
    t = raw.interactions
    assert t.column_names == ["user_id", "item_id", "timestamp", "rating"]
    assert t["user_id"].to_pylist() == ["alice", "bob", "alice"]
    assert t["timestamp"].to_pylist()[0] == 1577872800
    assert str(t.schema.field("rating").type) == "float"


def test_prepare_csv_ctr_without_side_features(tmp_path):
    p = tmp_path / "events.csv"
    p.write_text(CSV)
    result = prepare_tabular(
        p, tmp_path / "out", user_col="user", item_col="item", time_col="when", rating_col="stars"
    )
    ds = PreparedDataset(tmp_path / "out")
    assert (
        result.counts["users"] == 2
        and result.counts["ctr_rows"] == 2
        and result.counts["ctr_dropped_neutral"] == 1
    )
    assert ds.idmap("user").tolist() == ["alice", "bob"]
    assert np.asarray(ds.column("ctr", "dense")).shape == (2, 0)
    assert {c for c, i in ds.tables["ctr"].columns.items() if i.vocab} == {"user", "item"}


def test_parquet_labels_and_hashing(tmp_path):
    p = tmp_path / "events.parquet"
    table = pa.table(
        {
            "u": pa.array([5, 6, 5, 5]),
            "i": pa.array([1, 2, 3, 1]),
            "t": pa.array([3, 1, 2, 4], pa.timestamp("s")),
            "y": pa.array([1.0, 0.0, 1.0, 0.0]),
        }
    )
    pq.write_table(table, p)
    result = prepare_tabular(
        p, tmp_path / "out", user_col="u", item_col="i", time_col="t", label_col="y", hash_buckets={"user": 7}
    )
    ds = PreparedDataset(tmp_path / "out")
    info = ds.info("interactions", "user")
    assert info.hash_buckets == 7 and info.vocab == 8 and info.idmap is None
    assert "user" not in ds.meta["idmaps"] and "item" in ds.meta["idmaps"]
    assert np.asarray(ds.column("interactions", "user")).tolist() == [1 + 5 % 7] * 3 + [1 + 6 % 7]
    assert np.asarray(ds.column("interactions", "timestamp")).tolist() == [2, 3, 4, 1]
    assert np.asarray(ds.column("ctr", "label")).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert result.counts["ctr_rows"] == 4


@pytest.mark.parametrize(
    ("text", "kw", "line", "field", "message"),
    [
        (CSV.replace(",4,", ",four,"), {"rating_col": "stars"}, 2, "stars", "not a number: 'four'"),
        (CSV.replace("2020-01-02", "yesterday"), {"time_col": "when"}, 3, "when", "ISO-8601"),
        (CSV, {"rating_col": "nope"}, 1, "nope", "no such column"),
        (CSV.replace(",2,x", ",0.5,x"), {"label_col": "stars"}, 2, "stars", "label must be in [0, 1]: 4.0"),
        (CSV.replace("bob,", ","), {}, 3, "user", "missing value"),
    ],
)
def test_csv_bad_rows(tmp_path, text, kw, line, field, message):
    p = tmp_path / "events.csv"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_tabular(p, user_col="user", item_col="item", **kw)
    assert (e.value.line, e.value.field) == (line, field) and "events.csv" in str(e.value)
    assert message in str(e.value)


def test_parquet_null_is_bad_row(tmp_path):
    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"u": [1, None, 3], "i": [1, 2, 3]}), p)
    with pytest.raises(DataError) as e:
        read_tabular(p, user_col="u", item_col="i")
    assert (e.value.line, e.value.field) == (2, "u")
    rows = BadRows(skip=True)
    assert read_tabular(p, user_col="u", item_col="i", bad_rows=rows).interactions.num_rows == 2
    assert rows.count == 1


@pytest.mark.shared_data
def test_real_deepctr_movielens_sample(shared_data, tmp_path):
    result = prepare_tabular(
        shared_data / "deepctr_samples" / "movielens_sample.txt",
        tmp_path / "out",
        user_col="user_id",
        item_col="movie_id",
        time_col="timestamp",
        rating_col="rating",
    )
    assert result.counts["interactions"] == 200
