"""Criteo TSV: streaming reader, TorchRec-style transforms, vocabularies, bad rows, splits."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

import data.criteo
from data.criteo import iter_criteo, prepare_criteo
from data.errors import BadRows, DataError
from data.shards import PreparedDataset


def row(label: int | None, ints: list[str], cats: list[str]) -> str:
    fields = ([] if label is None else [str(label)]) + ints + cats
    return "\t".join(fields)


def make_rows(n: int, labeled: bool = True, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        ints = [str(int(v)) for v in rng.integers(-2, 500, 13)]
        ints[2] = "" if k % 3 == 0 else ints[2]  # I3 sometimes missing
        cats = [f"{int(v):08x}" for v in rng.integers(0, 6, 26)]  # few distinct values: vocab tests
        cats[4] = "" if k % 4 == 0 else cats[4]  # C5 sometimes missing
        rows.append(row(k % 2 if labeled else None, ints, cats))
    return rows


def write_tsv(path: Path, rows: list[str], final_newline: bool = False) -> Path:
    path.write_text("\n".join(rows) + ("\n" if final_newline else ""))
    return path


def test_reader_values(tmp_path):
    ints = ["1", "-3", "", "0", "7"] + ["2"] * 8
    cats = ["68fd1e64", "", "FFFFFFFF"] + ["00000001"] * 23
    p = write_tsv(tmp_path / "train.txt", [row(1, ints, cats)])
    (block,) = list(iter_criteo(p))
    assert block.num_rows == 1
    assert block["label"].to_pylist() == [1]
    assert block["I2"].to_pylist() == [-3] and block["I3"].to_pylist() == [None]
    assert block["C1"].to_pylist() == [int("68fd1e64", 16)] and block["C2"].to_pylist() == [None]
    assert block["C3"].to_pylist() == [0xFFFFFFFF]


def test_prepare_hashed_transforms(tmp_path):
    ints = ["1", "-3", "", "0", "7"] + ["2"] * 8
    cats = ["68fd1e64", "", "FFFFFFFF"] + ["00000001"] * 23
    p = write_tsv(tmp_path / "train.txt", [row(1, ints, cats), row(0, ints, cats)])
    result = prepare_criteo([p], tmp_path / "out", hash_buckets=1000)
    ds = PreparedDataset(tmp_path / "out")
    dense = np.asarray(ds.column("ctr", "dense"))
    assert dense.dtype == np.float32 and dense.shape == (2, 13)
    assert dense[0, :5].tolist() == pytest.approx([math.log(2), 0.0, 0.0, 0.0, math.log(8)])
    c1 = np.asarray(ds.column("ctr", "C1"))
    assert c1.tolist() == [1 + int("68fd1e64", 16) % 1000] * 2
    assert np.asarray(ds.column("ctr", "C2")).tolist() == [0, 0]  # missing -> OOV
    info = ds.info("ctr", "C1")
    assert info.vocab == 1001 and info.hash_buckets == 1000 and info.idmap is None
    assert np.asarray(ds.column("ctr", "label")).tolist() == [1.0, 0.0]
    assert ds.info("ctr", "dense").names == [f"I{i}" for i in range(1, 14)]
    assert result.counts == {"ctr_rows": 2, "ctr_positives": 1}
    spec = {f["name"]: f for f in ds.meta["feature_spec"]}
    assert spec["C7"]["hash_buckets"] == 1000 and "int(x, 16)" in spec["C7"]["index"]
    assert spec["dense"]["transforms"][0]["transform"].startswith("log(1 + max(x, 0))")


def test_blocks_do_not_change_the_result(tmp_path):
    p = write_tsv(tmp_path / "train.txt", make_rows(300))  # last line without newline
    prepare_criteo([p], tmp_path / "one", hash_buckets=50, block_bytes=1 << 20)
    prepare_criteo([p], tmp_path / "many", hash_buckets=50, block_bytes=2000)
    a, b = PreparedDataset(tmp_path / "one"), PreparedDataset(tmp_path / "many")
    for col in ["C1", "C5", "C26", "dense", "label", "split"]:
        assert np.array_equal(np.asarray(a.column("ctr", col)), np.asarray(b.column("ctr", col))), col
    assert a.tables["ctr"].rows == 300


def test_streams_in_bounded_blocks(tmp_path, monkeypatch):
    p = write_tsv(tmp_path / "train.txt", make_rows(400), final_newline=True)
    seen: list[int] = []
    real = data.criteo.parse_block

    def spy(block: bytes, *args: object, **kw: object):
        seen.append(len(block))
        return real(block, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(data.criteo, "parse_block", spy)
    prepare_criteo([p], tmp_path / "out", hash_buckets=10, block_bytes=4096)
    longest_line = max(len(r) for r in make_rows(400)) + 1
    assert len(seen) > 10 and max(seen) <= 4096 + longest_line
    assert sum(seen) == os.path.getsize(p)


def test_min_count_vocabulary(tmp_path):
    rows = make_rows(200)
    rare = row(1, ["1"] * 13, ["0000abcd"] + ["00000001"] * 25)  # C1 value seen once
    p = write_tsv(tmp_path / "train.txt", [*rows, rare])
    prepare_criteo([p], tmp_path / "out", min_count=2, block_bytes=3000)
    ds = PreparedDataset(tmp_path / "out")
    idmap = ds.idmap("C1")
    assert idmap.tolist() == list(range(6))  # int(x, 16) of the 6 frequent values, sorted
    c1 = np.asarray(ds.column("ctr", "C1"))
    assert c1[-1] == 0 and c1[:-1].min() >= 1  # rare -> OOV
    assert ds.info("ctr", "C1").vocab == 7 and ds.info("ctr", "C1").idmap == "C1"
    c5 = np.asarray(ds.column("ctr", "C5"))
    assert (c5[:200:4] == 0).all()  # missing -> OOV


@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        (lambda f: f.__setitem__(20, "68fd1eZ4"), "C7", "not hex"),
        (lambda f: f.__setitem__(20, "68fd1e6"), "C7", "not hex"),
        (lambda f: f.__setitem__(3, "4.5"), "I3", "not an integer: '4.5'"),
        (lambda f: f.__setitem__(0, "2"), "label", "label must be 0 or 1"),
        (lambda f: f.__setitem__(0, ""), "label", "missing value"),
        (lambda f: f.__delitem__(slice(38, 40)), None, "wrong number of fields: 38, expected 40"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, bad, field, message):
    rows = make_rows(120)
    fields = rows[100].split("\t")
    bad(fields)
    rows[100] = "\t".join(fields)
    p = write_tsv(tmp_path / "day_0", rows)
    with pytest.raises(DataError) as e:
        prepare_criteo([p], tmp_path / "out", hash_buckets=10, block_bytes=2500)  # error in a later block
    assert (Path(e.value.path).name, e.value.line, e.value.field) == ("day_0", 101, field)
    assert message in str(e.value) and "day_0:101" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["day_0"]  # no temporary directory left


def test_skip_bad_rows(tmp_path):
    rows = make_rows(50)
    rows[10] = rows[10].replace("\t", "\tzz", 1)  # I1 not an integer
    rows[20] = "1\t2"
    p = write_tsv(tmp_path / "train.txt", rows)
    result = prepare_criteo([p], tmp_path / "out", hash_buckets=10, skip_bad_rows=True, block_bytes=1000)
    assert result.counts["ctr_rows"] == 48 and result.bad_rows.count == 2
    assert PreparedDataset(tmp_path / "out").meta["bad_rows"]["count"] == 2
    assert "bad rows skipped: 2" in result.report()


def test_empty_file(tmp_path):
    p = write_tsv(tmp_path / "train.txt", [])
    with pytest.raises(DataError, match="empty file"):
        prepare_criteo([p], tmp_path / "out", hash_buckets=10)


def test_test_file_and_splits(tmp_path):
    train = write_tsv(tmp_path / "train.txt", make_rows(500))
    test = write_tsv(tmp_path / "test.txt", make_rows(30, labeled=False, seed=1))
    result = prepare_criteo([train], tmp_path / "out", hash_buckets=100, test_file=test, seed=3)
    ds = PreparedDataset(tmp_path / "out")
    assert ds.tables["ctr_unlabeled"].rows == 30 and "label" not in ds.tables["ctr_unlabeled"].columns
    assert result.counts["ctr_unlabeled_rows"] == 30
    s = result.splits["ctr"]
    assert s["train"] + s["val"] + s["test"] == 500 and 350 < s["train"] < 450
    prepare_criteo([train], tmp_path / "temporal", hash_buckets=100, ctr_split="temporal")
    split = np.asarray(PreparedDataset(tmp_path / "temporal").column("ctr", "split"))
    assert split.tolist() == [0] * 400 + [1] * 50 + [2] * 50
    with pytest.raises(ValueError, match="exactly one"):
        prepare_criteo([train], tmp_path / "x", hash_buckets=10, min_count=2)


def test_several_day_files(tmp_path):
    days = [write_tsv(tmp_path / f"day_{d}", make_rows(40, seed=d)) for d in range(3)]
    result = prepare_criteo(days, tmp_path / "out", hash_buckets=10, ctr_split="temporal")
    assert result.counts["ctr_rows"] == 120


def test_bad_rows_policy_object_counts(tmp_path):
    rows = make_rows(5) + ["0\tbad"]
    policy = BadRows(skip=True)
    blocks = list(iter_criteo(write_tsv(tmp_path / "t.txt", rows), bad_rows=policy))
    assert sum(b.num_rows for b in blocks) == 5 and policy.count == 1


@pytest.mark.shared_data
def test_real_kaggle_head(shared_data, tmp_path):
    d = shared_data / "criteo_kaggle_head"
    result = prepare_criteo(
        [d / "train.txt"],
        tmp_path / "criteo",
        hash_buckets=10_000,
        test_file=d / "test.txt",
        block_bytes=50_000,
    )
    assert result.counts == {"ctr_rows": 900, "ctr_positives": 176, "ctr_unlabeled_rows": 100}
    ds = PreparedDataset(tmp_path / "criteo")
    first = "0\t1\t1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t68fd1e64".split("\t")
    dense = np.asarray(ds.column("ctr", "dense"))[0]
    expected = [math.log1p(int(x)) if x else 0.0 for x in first[1:14]]
    assert dense.tolist() == pytest.approx(expected, rel=1e-6)
    assert int(np.asarray(ds.column("ctr", "C1"))[0]) == 1 + int("68fd1e64", 16) % 10_000
    vocab = prepare_criteo([d / "train.txt"], tmp_path / "vocab", min_count=1)
    assert vocab.counts["ctr_rows"] == 900
