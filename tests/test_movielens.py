"""MovieLens readers (all layouts), bad input, and the prepared dataset they produce."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data.errors import BadRows, DataError
from data.movielens import detect_variant, movielens_features, read_movielens, title_year
from data.prepare import prepare_movielens
from data.shards import SPLIT_CODES, PreparedDataset

TRAIN, VAL, TEST = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]

U_DATA = "".join(
    f"{u}\t{i}\t{r}\t{t}\n"
    for u, i, r, t in [
        (1, 1, 5, 100),
        (1, 2, 3, 90),
        (1, 3, 4, 120),
        (1, 4, 1, 80),
        (2, 1, 2, 50),
        (2, 2, 4, 60),
        (2, 4, 5, 55),
        (3, 1, 5, 10),
        (3, 3, 3, 11),
    ]
)
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|T8H1N\n"
U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
    "2|Misérables, Les (1995)|01-Jan-1995||http://x|0|1|1\n"
    "3|unknown|||http://x|1|0|0\n"
    "4|Old Film|01-Jan-1937||http://x|0|1|0\n"
)
U_GENRE = "unknown|0\nAction|1\nComedy|2\n\n"


def write_ml100k(d: Path, **overrides: str) -> Path:
    """A 3-user, 4-movie ML-100K directory (u.item in ISO-8859-1, like the real one)."""
    d.mkdir(parents=True, exist_ok=True)
    files = {"u.data": U_DATA, "u.user": U_USER, "u.item": U_ITEM, "u.genre": U_GENRE, **overrides}
    for name, text in files.items():
        (d / name).write_bytes(text.encode("latin-1"))
    return d


def write_ml1m(d: Path, with_users: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if with_users:
        (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Comedy\n2::Café (2000)::Drama\n".encode("latin-1")
    )
    (d / "ratings.dat").write_text("1::1::5::978300760\n2::2::3::978302109\n1::2::4::978301968\n")
    return d


def write_ml20m(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.5,1000\n1,2,3.5,1001\n2,1,2.0,1002\n"
    )
    (d / "movies.csv").write_text(
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
        "2,Unknown Film,(no genres listed)\n"
    )
    return d


def error_of(d: Path, **kw: object) -> DataError:
    with pytest.raises(DataError) as e:
        read_movielens(d, **kw)  # type: ignore[arg-type]
    return e.value


# -- reading -----------------------------------------------------------------------------------


def test_read_ml100k(tmp_path):
    raw = read_movielens(write_ml100k(tmp_path / "ml"))
    assert raw.name == "ml-100k"
    inter = raw.interactions
    assert inter.column_names == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(t) for t in inter.schema.types] == ["int64", "int64", "float", "int64"]
    assert inter.num_rows == 9 and inter["rating"].to_pylist()[:2] == [5.0, 3.0]
    assert raw.users.column_names == ["user_id", "age", "gender", "occupation", "zip"]
    assert raw.users["zip"].to_pylist()[2] == "T8H1N"
    items = raw.items.to_pylist()
    assert items[1]["title"] == "Misérables, Les (1995)"  # decoded from ISO-8859-1
    assert [i["genres"] for i in items] == [["Comedy"], ["Action", "Comedy"], ["unknown"], ["Action"]]
    assert [i["year"] for i in items] == [1995, 1995, None, 1937]


def test_read_ml1m_ml10m_ml20m(tmp_path):
    raw = read_movielens(write_ml1m(tmp_path / "m1"))
    assert raw.name == "ml-1m"
    assert raw.users.to_pylist()[0] == {
        "user_id": 1,
        "age": 1,
        "gender": "F",
        "occupation": "10",
        "zip": "48067",
    }
    assert raw.items.to_pylist()[1] == {
        "item_id": 2,
        "title": "Café (2000)",
        "genres": ["Drama"],
        "year": 2000,
    }
    assert raw.interactions["timestamp"].to_pylist() == [978300760, 978302109, 978301968]

    raw = read_movielens(write_ml1m(tmp_path / "m10", with_users=False))
    assert raw.name == "ml-10m" and raw.users is None

    raw = read_movielens(write_ml20m(tmp_path / "m20"))
    assert raw.name == "ml-20m"
    assert raw.items["title"].to_pylist()[0] == "American President, The (1995)"
    assert raw.items["genres"].to_pylist() == [["Comedy", "Drama"], []]
    assert raw.interactions["rating"].to_pylist() == [4.5, 3.5, 2.0]


def test_gzipped_ratings_and_override(tmp_path):
    d = write_ml1m(tmp_path / "m1")
    text = (d / "ratings.dat").read_bytes()
    (d / "ratings.dat").unlink()
    elsewhere = tmp_path / "r" / "ratings.dat.gz"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(gzip.compress(text))
    with pytest.raises(DataError, match="no MovieLens ratings file"):
        read_movielens(d)
    assert read_movielens(d, ratings_file=elsewhere).interactions.num_rows == 3


def test_detect_variant(tmp_path):
    assert detect_variant(write_ml100k(tmp_path / "a"))[0] == "ml-100k"
    assert detect_variant(write_ml20m(tmp_path / "b"))[0] == "ml-20m"


def test_title_year():
    assert title_year("Heat (1995)") == 1995
    assert title_year("Heat (1995) ") == 1995
    assert title_year("unknown", "01-Jan-1937") == 1937
    assert title_year("unknown", None) is None


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "text", "line", "field", "message"),
    [
        ("u.data", U_DATA.replace("1\t2\t3\t90", "1\t2\tx\t90"), 2, "rating", "not a number: 'x'"),
        (
            "u.data",
            U_DATA.replace("1\t2\t3\t90", "1\t2\t3"),
            2,
            None,
            "wrong number of fields: 3, expected 4",
        ),
        ("u.data", U_DATA + "1\t5\t4\t130\n", 10, "item_id", "unknown id 5 (not in u.item)"),
        ("u.data", U_DATA + "4\t1\t4\t130\n", 10, "user_id", "unknown id 4 (not in u.user)"),
        ("u.data", U_DATA + "0\t1\t4\t130\n", 10, "user_id", "non-positive id 0"),
        ("u.data", U_DATA + "1\t1\t7\t130\n", 10, "rating", "rating out of range"),
        ("u.data", U_DATA + "1\t1\t\t130\n", 10, "rating", "missing value"),
        (
            "u.item",
            U_ITEM + "4|Again (1999)|||x|0|0|1\n",
            5,
            "item_id",
            "duplicate movie id 4 (first on line 4)",
        ),
        ("u.item", U_ITEM.replace("x|0|0|1", "x|0|2|1"), 1, "Action", "genre flag must be 0 or 1"),
        ("u.user", U_USER.replace("2|53|F", "2|old|F"), 2, "age", "not an integer: 'old'"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, file, text, line, field, message):
    d = write_ml100k(tmp_path / "ml", **{file: text})
    err = error_of(d)
    assert Path(err.path).name == file and err.line == line and err.field == field
    assert message in str(err)
    assert f"{file}:{line}" in str(err)


def test_empty_and_missing_files(tmp_path):
    d = write_ml100k(tmp_path / "ml", **{"u.data": ""})
    assert "empty file" in str(error_of(d))
    d = write_ml100k(tmp_path / "ml2")
    (d / "u.item").unlink()
    assert "u.item: file not found" in str(error_of(d))


def test_ml1m_bad_row(tmp_path):
    d = write_ml1m(tmp_path / "m1")
    (d / "ratings.dat").write_text("1::1::5::978300760\n2::2::3::97830x109\n")
    err = error_of(d)
    assert (Path(err.path).name, err.line, err.field) == ("ratings.dat", 2, "timestamp")


def test_skip_bad_rows_counts(tmp_path):
    bad = U_DATA + "1\t1\tx\t1\n" + "1\t99\t4\t1\n" + "1\t1\n"
    d = write_ml100k(tmp_path / "ml", **{"u.data": bad})
    rows = BadRows(skip=True)
    raw = read_movielens(d, bad_rows=rows)
    assert raw.interactions.num_rows == 9
    assert rows.count == 3
    assert "u.data:12" in rows.examples[0]  # the structural error is found first


# -- prepared dataset --------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path) -> PreparedDataset:
    prepare_movielens(write_ml100k(tmp_path / "ml"), tmp_path / "out")
    return PreparedDataset(tmp_path / "out")


def test_prepare_interactions_and_sequences(prepared):
    ds = prepared
    assert ds.counts["interactions"] == 9 and ds.counts["users"] == 3 and ds.counts["items"] == 4
    user = np.asarray(ds.column("interactions", "user"))
    item = np.asarray(ds.column("interactions", "item"))
    split = np.asarray(ds.column("interactions", "split"))
    assert user.tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3]  # sorted by user, then time
    assert item.tolist() == [4, 2, 1, 3, 1, 4, 2, 1, 3]
    assert split.tolist() == [TRAIN, TRAIN, VAL, TEST, TRAIN, VAL, TEST, TRAIN, TRAIN]
    assert ds.info("interactions", "user").vocab == 4 and ds.info("interactions", "item").idmap == "item"
    seq = ds.jagged("sequences", "items")
    assert np.asarray(ds.column("sequences", "user")).tolist() == [1, 2, 3]
    assert [seq.row(r).tolist() for r in range(3)] == [[4, 2, 1, 3], [1, 4, 2], [1, 3]]
    assert ds.idmap("user").tolist() == [1, 2, 3]


def test_prepare_side_tables(prepared):
    ds = prepared
    gender = np.asarray(ds.column("users", "gender"))
    assert ds.idmap("gender").tolist() == ["F", "M"] and gender.tolist() == [0, 2, 1, 2]
    assert ds.info("users", "gender").vocab == 3
    assert ds.idmap("age_bucket").tolist() == [1, 18, 50]
    assert np.asarray(ds.column("users", "age_bucket")).tolist() == [0, 2, 3, 1]
    assert ds.idmap("zip_prefix").tolist() == ["857", "940", "T8H"]
    age = np.asarray(ds.column("users", "age"))
    assert age[0] == 0 and abs(age[1:].mean()) < 1e-6  # z-scored, OOV row zero
    genres = ds.jagged("items", "genres")
    names = ds.idmap("genres")
    assert [names[genres.row(i) - 1].tolist() for i in range(1, 5)] == [
        ["Comedy"],
        ["Action", "Comedy"],
        ["unknown"],
        ["Action"],
    ]
    assert len(genres.row(0)) == 0
    year_bucket = np.asarray(ds.column("items", "year_bucket"))
    assert ds.idmap("year_bucket").tolist() == [1930, 1990]
    assert year_bucket.tolist() == [0, 2, 2, 0, 1]  # unknown year -> OOV
    assert np.asarray(ds.column("items", "year"))[3] == 0.0
    assert ds.idmap("item_title")[1] == "Misérables, Les (1995)"


def test_prepare_ctr(prepared):
    ds = prepared
    cols = ds.tables["ctr"].columns
    sparse = {"user", "item", "age_bucket", "gender", "occupation", "zip_prefix", "genres", "year_bucket"}
    assert {c for c, i in cols.items() if i.vocab is not None} == sparse
    assert cols["genres"].jagged and cols["dense"].names == ["age", "year"] and cols["dense"].width == 2
    assert (
        ds.counts["ctr_rows"] == 7
        and ds.counts["ctr_dropped_neutral"] == 2
        and ds.counts["ctr_positives"] == 5
    )
    label = np.asarray(ds.column("ctr", "label"))
    user = np.asarray(ds.column("ctr", "user"))
    item = np.asarray(ds.column("ctr", "item"))
    pairs = {(int(u), int(i)): float(v) for u, i, v in zip(user, item, label, strict=True)}
    assert pairs == {(1, 4): 0, (1, 1): 1, (1, 3): 1, (2, 1): 0, (2, 4): 1, (2, 2): 1, (3, 1): 1}
    gender = np.asarray(ds.column("ctr", "gender"))
    assert np.array_equal(gender, np.asarray(ds.column("users", "gender"))[user])
    genres = ds.jagged("ctr", "genres")
    row = int(np.flatnonzero((user == 1) & (item == 2 + 1))[0])  # item 3 = "unknown" genre
    assert ds.idmap("genres")[genres.row(row) - 1].tolist() == ["unknown"]
    dense = np.asarray(ds.column("ctr", "dense"))
    assert dense.shape == (7, 2) and dense.dtype == np.float32
    assert dense[item == 3, 1].tolist() == [0.0]  # unknown year
    assert np.asarray(ds.column("ctr", "split")).dtype == np.uint8
    spec = {f["name"]: f for f in ds.meta["feature_spec"]}
    assert spec["zip_prefix"]["transform"] == "prefix" and spec["zip_prefix"]["idmap"] == "zip_prefix"
    assert spec["dense"]["transforms"][0]["transform"] == "zscore"
    assert ds.meta["bad_rows"]["count"] == 0
    assert ds.meta["splits"]["interactions"]["kind"] == "loo"


def test_ctr_temporal_split(tmp_path):
    prepare_movielens(
        write_ml100k(tmp_path / "ml"), tmp_path / "out", ctr_split="temporal", fractions=(0.5, 0.25, 0.25)
    )
    ds = PreparedDataset(tmp_path / "out")
    ts = np.asarray(ds.column("interactions", "timestamp"))
    rating = np.asarray(ds.column("interactions", "rating"))
    split = np.asarray(ds.column("ctr", "split"))
    kept_ts = ts[rating != 3]
    assert kept_ts[split == TEST].min() >= kept_ts[split == TRAIN].max()


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    d = write_ml100k(tmp_path / "ml")
    out = tmp_path / "out"
    with pytest.raises(DataError):
        prepare_movielens(write_ml100k(tmp_path / "bad", **{"u.data": U_DATA + "x\n"}), out)
    assert not out.exists()

    import data.prepare

    def boom(*args: object, **kw: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(data.prepare, "_write_ctr", boom)  # fail half way through writing
    with pytest.raises(RuntimeError):
        prepare_movielens(d, out)
    assert sorted(os.listdir(tmp_path)) == ["bad", "ml"]  # no output, no temporary directory

    monkeypatch.undo()
    prepare_movielens(d, out)
    before = (out / "meta.json").read_text()
    monkeypatch.setattr(data.prepare, "_write_ctr", boom)
    with pytest.raises(RuntimeError):
        prepare_movielens(d, out, overwrite=True)
    assert (out / "meta.json").read_text() == before  # the old dataset survives
    assert sorted(os.listdir(tmp_path)) == ["bad", "ml", "out"]
    with pytest.raises(FileExistsError):
        prepare_movielens(d, out)


def test_skip_bad_rows_recorded_in_meta(tmp_path):
    d = write_ml100k(tmp_path / "ml", **{"u.data": U_DATA + "1\t1\tx\t1\n"})
    result = prepare_movielens(d, tmp_path / "out", skip_bad_rows=True)
    assert result.bad_rows.count == 1 and "bad rows skipped: 1" in result.report()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["bad_rows"]["count"] == 1 and "u.data:10" in meta["bad_rows"]["examples"][0]


def test_features_without_users(tmp_path):
    raw = movielens_features(read_movielens(write_ml20m(tmp_path / "m20")))
    assert raw.users is None and raw.items.column_names == [
        "item_id",
        "title",
        "genres",
        "year",
        "year_bucket",
    ]


# -- the real files ----------------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_ml100k(shared_data, tmp_path):
    raw = read_movielens(shared_data / "movielens-100k")
    inter = raw.interactions
    assert inter.num_rows == 100_000
    assert len(np.unique(inter["user_id"].to_numpy())) == 943
    assert len(np.unique(inter["item_id"].to_numpy())) == 1_682
    assert raw.users.num_rows == 943 and raw.items.num_rows == 1_682
    counts = np.unique(inter["rating"].to_numpy(), return_counts=True)[1]
    assert counts.tolist() == [6_110, 11_370, 27_145, 34_174, 21_201]
    result = prepare_movielens(shared_data / "movielens-100k", tmp_path / "ml100k")
    assert (result.counts["interactions"], result.counts["users"], result.counts["items"]) == (
        100_000,
        943,
        1_682,
    )
    assert result.counts["ctr_dropped_neutral"] == 27_145 and result.counts["ctr_rows"] == 72_855
    assert "interactions 100,000  users 943  items 1,682" in result.report()


@pytest.mark.shared_data
def test_real_ml1m_dat_files(shared_data, tmp_path):
    src = shared_data / "movielens-1m"
    d = tmp_path / "ml1m"
    d.mkdir()
    for name in ("users.dat", "movies.dat"):
        (d / name).symlink_to(src / name)
    (d / "ratings.dat.gz").symlink_to(src / "ratings_users_1-2999" / "ratings.dat.gz")
    raw = read_movielens(d)
    assert raw.name == "ml-1m"
    assert raw.users.num_rows == 6_040 and raw.items.num_rows == 3_883
    assert raw.interactions.num_rows == 487_650
    assert len(np.unique(raw.interactions["user_id"].to_numpy())) == 2_999
    assert len(np.unique(raw.interactions["item_id"].to_numpy())) == 3_615
    assert set(raw.users["age"].to_pylist()) == {1, 18, 25, 35, 45, 50, 56}
    assert raw.items.filter(raw.items["item_id"].to_numpy() == 1).to_pylist()[0]["genres"] == [
        "Animation",
        "Children's",
        "Comedy",
    ]
