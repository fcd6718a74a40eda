"""``funnel data prepare ...`` and ``funnel data info``, run in-process through launch.cli.main."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from data.shards import ColumnInfo, DatasetWriter, PreparedDataset
from launch.cli import main


def write_ml100k(d: Path, ratings: str = "1\t1\t5\t10\n1\t2\t1\t11\n2\t1\t4\t12\n") -> Path:
    d.mkdir()
    (d / "u.data").write_text(ratings)
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (d / "u.item").write_text("1|A (1995)|||x|1|0\n2|B (1990)|||x|0|1\n")
    (d / "u.genre").write_text("Action|0\nDrama|1\n")
    return d


def test_prepare_movielens_and_info(tmp_path, capsys):
    d = write_ml100k(tmp_path / "ml")
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "movielens", "--input", str(d), "--out", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "interactions 3  users 2  items 2" in text
    assert "ctr rows 3  positives 2" in text and "bad rows: 0" in text and "elapsed" in text
    assert PreparedDataset(out).meta["splits"]["seed"] == 3

    assert main(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "ml-100k" in info and "interactions: 3 rows" in info and "gender: int64, vocab 3" in info


def test_existing_output_needs_overwrite(tmp_path, capsys):
    d = write_ml100k(tmp_path / "ml")
    args = ["data", "prepare", "movielens", "--input", str(d), "--out", str(tmp_path / "o")]
    assert main(args) == 0
    assert main(args) == 1
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--ctr-split", "temporal"]) == 0


def test_bad_input_is_one_line_and_no_output(tmp_path, capsys):
    d = write_ml100k(tmp_path / "ml", ratings="1\t1\t5\t10\n1\t2\tfive\t11\n")
    out = tmp_path / "o"
    assert main(["data", "prepare", "movielens", "--input", str(d), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "u.data:2: field 'rating': not a number: 'five'" in err and "Traceback" not in err
    assert not out.exists()

    assert (
        main(["data", "prepare", "movielens", "--input", str(d), "--out", str(out), "--skip-bad-rows"]) == 0
    )
    assert "bad rows skipped: 1" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["bad_rows"]["count"] == 1


def test_prepare_sasrec_user_items_tabular(tmp_path, capsys):
    (tmp_path / "s.txt").write_text("1 1\n1 2\n2 2\n")
    assert (
        main(["data", "prepare", "sasrec", "--input", str(tmp_path / "s.txt"), "--out", str(tmp_path / "a")])
        == 0
    )
    assert "interactions 3  users 2  items 2" in capsys.readouterr().out

    (tmp_path / "train.txt").write_bytes(b"0 1 2\r\n1 2\r\n")
    (tmp_path / "test.txt").write_bytes(b"0 3\r\n")
    args = [
        "data",
        "prepare",
        "user-items",
        "--input",
        str(tmp_path / "train.txt"),
        "--out",
        str(tmp_path / "b"),
    ]
    assert main([*args, "--test-file", str(tmp_path / "test.txt")]) == 0
    assert "split given: train 3  val 0  test 1" in capsys.readouterr().out

    (tmp_path / "e.csv").write_text("u;i;y\na;x;1\nb;x;0\n")
    args = ["data", "prepare", "tabular", "--input", str(tmp_path / "e.csv"), "--out", str(tmp_path / "c")]
    assert main([*args, "--user-col", "u", "--item-col", "i", "--label-col", "y", "--sep", ";"]) == 0
    assert "ctr rows 2  positives 1" in capsys.readouterr().out


def test_prepare_criteo(tmp_path, capsys):
    row = "\t".join(["1"] + ["3"] * 13 + ["0000000a"] * 26)
    (tmp_path / "train.txt").write_text(f"{row}\n{row}")
    args = ["data", "prepare", "criteo", "--input", str(tmp_path / "train.txt"), "--out", str(tmp_path / "c")]
    assert main([*args, "--hash-buckets", "7", "--ctr-split", "temporal"]) == 0
    assert "ctr rows 2  positives 2" in capsys.readouterr().out
    assert np.asarray(PreparedDataset(tmp_path / "c").column("ctr", "C1")).tolist() == [1 + 10 % 7] * 2
    with pytest.raises(SystemExit):  # --hash-buckets or --min-count is required
        main(args)
    with pytest.raises(SystemExit):
        main([*args, "--hash-buckets", "7", "--min-count", "2"])


def test_prepare_synthetic_calls_the_generator(tmp_path, capsys, monkeypatch):
    calls: list[tuple[object, ...]] = []

    def fake(out: Path, preset: str, seed: int | None = None, overwrite: bool = False) -> Path:
        calls.append((out, preset, seed, overwrite))
        with DatasetWriter(out, f"synthetic-{preset}", overwrite=overwrite) as w:
            w.write_column("interactions", "user", np.array([1, 2]), ColumnInfo("int64", vocab=3))
            w.counts = {"interactions": 2, "users": 2, "items": 1}
        return out

    module = types.ModuleType("data.synthetic")
    module.prepare_synthetic = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "data.synthetic", module)
    out = tmp_path / "syn"
    assert main(["data", "prepare", "synthetic", "--preset", "tiny", "--out", str(out), "--seed", "5"]) == 0
    assert calls == [(out, "tiny", 5, False)]
    assert "interactions 2  users 2  items 1" in capsys.readouterr().out


def test_info_on_missing_dataset(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path)]) == 1
    assert "not a prepared dataset" in capsys.readouterr().err


@pytest.mark.shared_data
def test_real_files_through_the_cli(shared_data, tmp_path, capsys):
    ml = ["data", "prepare", "movielens", "--input", str(shared_data / "movielens-100k"), "--out"]
    assert main([*ml, str(tmp_path / "ml")]) == 0
    assert "interactions 100,000  users 943  items 1,682" in capsys.readouterr().out
    video = shared_data / "sasrec_video" / "Video.txt"
    assert main(["data", "prepare", "sasrec", "--input", str(video), "--out", str(tmp_path / "v")]) == 0
    assert "users 31,013  items 23,715" in capsys.readouterr().out
    criteo = shared_data / "criteo_kaggle_head"
    args = [
        "data",
        "prepare",
        "criteo",
        "--input",
        str(criteo / "train.txt"),
        "--test-file",
        str(criteo / "test.txt"),
    ]
    assert main([*args, "--min-count", "2", "--out", str(tmp_path / "c")]) == 0
    assert "ctr rows 900  positives 176" in capsys.readouterr().out
