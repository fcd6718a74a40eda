"""Bundles: ranking + retrieval artifacts + item/user features + trending, one verified directory.

Guarded here: every file holds what the dataset and artifacts hold (features by index, trending =
training popularity, diversity vectors = the retrieval item vectors), the top-level manifest covers
everything, mismatched inputs are refused before anything is written, a tampered or incompatible
bundle does not load, and the bundle is logged as an offline W&B Artifact of type ``bundle``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_engine import torchrun, write_config

from data.shards import SPLIT_CODES, PreparedDataset
from serving.bundle import BundleError, verify
from serving.funnel import Funnel, RecommendRequest
from trainer.export_bundle import export_bundle
from trainer.export_ranking import export_ranking
from trainer.faiss_export import IndexConfig, write_retrieval_artifact

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny world, a DeepFM ranking artifact (1-rank run) and a retrieval artifact of real FAISS."""
    from data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("bundle")
    world = prepare_synthetic(root / "tiny", "tiny", seed=0)
    cfg = write_config(
        root / "cfg.yaml",
        world,
        root / "run",
        trainer={"checkpoint_every_n_steps": None, "max_epochs": 1, "test_after_fit": False},
    )
    torchrun(1, ["--config", str(cfg)])
    export_ranking(root / "run/checkpoints/final.ckpt", cfg, root / "ranking", "fp32")
    ds = PreparedDataset(world)
    ids = ds.idmap("item")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(ids), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    meta = {"model_type": "random", "model_fingerprint": "r0"}
    write_retrieval_artifact(
        root / "retrieval", emb[::-1], ids[::-1], IndexConfig(kind="flat"), query_encoder=None, meta=meta
    )
    foreign = np.char.add("other-", ids)
    write_retrieval_artifact(
        root / "foreign", emb, foreign, IndexConfig(kind="flat"), query_encoder=None, meta=meta
    )
    other_world = prepare_synthetic(root / "tiny-seed1", "tiny", seed=1)
    # the same item ids, but the manifest says another dataset trained it
    write_retrieval_artifact(
        root / "other-data", emb, ids, IndexConfig(kind="flat"), query_encoder=None,
        meta={**meta, "data_fingerprint": "0" * 64},
    )  # fmt: skip
    return {
        "root": root,
        "world": world,
        "other_world": other_world,
        "ranking": root / "ranking",
        "retrieval": root / "retrieval",
        "foreign": root / "foreign",
        "other_data": root / "other-data",
        "embeddings": root,
    }


@pytest.fixture(scope="module")
def bundle(parts: dict[str, Path]) -> Path:
    out = parts["root"] / "bundle"
    export_bundle(parts["ranking"], {"random": parts["retrieval"]}, parts["world"], out, history_length=10)
    return out


@pytest.mark.slow
def test_bundle_holds_the_features_popularity_and_vectors_of_its_sources(
    parts: dict[str, Path], bundle: Path
) -> None:
    manifest = verify(bundle)
    assert manifest["kind"] == "bundle"
    files = set(manifest["files"])
    assert {
        "ranking/deepfm/model.pt2",
        "ranking/deepfm/manifest.json",
        "retrieval/random/index.faiss",
        "items/ids.npy",
        "items/embeddings.npy",
        "items/trending.json",
        "users/history.npy",
    } <= files
    assert manifest["extra"]["training_runs"]["ranking/deepfm"] == str((parts["root"] / "run").resolve())
    assert "deepfm" in manifest["models"]["ranking"] and "random" in manifest["models"]["retrieval"]

    ds = PreparedDataset(parts["world"])
    items = bundle / "items"
    assert np.array_equal(np.load(items / "ids.npy"), ds.idmap("item"))
    assert np.array_equal(np.load(items / "sparse/category.npy"), ds.column("items", "category"))
    tags = np.load(items / "sparse/tags.npy")
    jag = ds.jagged("items", "tags")
    for i in (1, 17, 250, 500):
        row = tags[i]
        assert row[row > 0].tolist() == jag.row(i).tolist()
    # item-side dense features are what the item's ctr rows carried
    info = json.loads((items / "features.json").read_text())
    dense = np.load(items / "dense.npy")
    names = list(ds.tables["ctr"].columns["dense"].names or [])
    ctr_items = np.asarray(ds.column("ctr", "item"))
    ctr_dense = np.asarray(ds.column("ctr", "dense"))
    for row in (0, 100, 5000):
        for j, name in enumerate(info["dense"]["names"]):
            assert dense[ctr_items[row], j] == pytest.approx(ctr_dense[row, names.index(name)], abs=1e-6)
    users = bundle / "users"
    assert np.array_equal(np.load(users / "sparse/region.npy"), ds.column("users", "region"))
    history = np.load(users / "history.npy")
    seq = ds.jagged("sequences", "items")
    user_of_row = np.asarray(ds.column("sequences", "user"))
    for r in (0, 5, 299):
        assert history[user_of_row[r]][history[user_of_row[r]] > 0].tolist() == seq.row(r)[-10:].tolist()

    trending = json.loads((items / "trending.json").read_text())["items"]
    split = np.asarray(ds.column("interactions", "split"))
    counts = np.bincount(
        np.asarray(ds.column("interactions", "item"))[split == SPLIT_CODES["train"]], minlength=501
    )
    assert [t["score"] for t in trending[:20]] == sorted(counts[1:], reverse=True)[:20]
    assert all(
        counts[t["index"]] == t["score"] and t["item_id"] == ds.idmap("item")[t["index"] - 1]
        for t in trending[:50]
    )

    # diversity vectors: the retrieval artifact's (stored in reverse order there), by item index
    vectors = np.load(items / "embeddings.npy")
    assert info["embeddings"]["source"] == "retrieval:random"
    source = np.load(parts["retrieval"] / "item_embeddings.npy")[::-1]
    np.testing.assert_allclose(vectors[1:], source, atol=1e-6)
    assert not vectors[0].any()


@pytest.mark.slow
def test_mismatched_inputs_are_refused_before_anything_is_written(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "b"
    with pytest.raises(BundleError, match="different dataset"):
        export_bundle(parts["ranking"], {}, parts["other_world"], out)
    with pytest.raises(BundleError, match="item ids"):
        export_bundle(parts["ranking"], {"x": parts["foreign"]}, parts["world"], out)
    with pytest.raises(BundleError, match="--retrieval x=.*different dataset"):
        export_bundle(parts["ranking"], {"x": parts["other_data"]}, parts["world"], out)
    tampered = tmp_path / "ranking"
    shutil.copytree(parts["ranking"], tampered)
    (tampered / "feature_spec.json").write_text((tampered / "feature_spec.json").read_text() + " ")
    with pytest.raises(BundleError, match="checksum mismatch for feature_spec.json"):
        export_bundle(tampered, {}, parts["world"], out)
    with pytest.raises(ValueError, match="diversity-embeddings"):
        export_bundle(parts["ranking"], {}, parts["world"], out, diversity_embeddings="retrieval:none")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ranking"], "a failed export left files behind"
    export_bundle(parts["ranking"], {}, parts["world"], out, diversity_embeddings="ranking:item")
    with pytest.raises(FileExistsError):
        export_bundle(parts["ranking"], {}, parts["world"], out)


@pytest.mark.slow
def test_a_tampered_or_incompatible_bundle_does_not_load(bundle: Path, tmp_path: Path) -> None:
    funnel = Funnel.load(bundle)
    answer = funnel.recommend(RecommendRequest(user_id=str(funnel.users.ids.raw[0]), k=5))
    assert len(answer["items"]) == 5 and answer["user_known"]

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(bundle, dst)
        return dst

    flipped = copy("flipped")
    data = bytearray((flipped / "items/dense.npy").read_bytes())
    data[-1] ^= 0xFF
    (flipped / "items/dense.npy").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for items/dense.npy"):
        Funnel.load(flipped)

    extra = copy("extra")
    (extra / "ranking/deepfm/evil.py").write_text("print('hi')")
    with pytest.raises(BundleError, match="not in the manifest"):
        Funnel.load(extra)

    future = copy("future")
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99"):
        Funnel.load(future)

    artifact = copy("artifact-only")
    with pytest.raises(BundleError, match="expected 'bundle'"):
        Funnel.load(artifact / "ranking" / "deepfm")


@pytest.mark.slow
def test_cli_logs_the_bundle_as_an_offline_wandb_artifact(parts: dict[str, Path], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
    }
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "export",
        "bundle",
        "--ranking",
        f"deepfm={parts['ranking']}",
        "--retrieval",
        f"random={parts['retrieval']}",
        "--dataset",
        str(parts["world"]),
        "--out",
        str(tmp_path / "bundle"),
        "--wandb-project",
        "funnel-test",
        "--wandb-run-id",
        "run0042",
        "--wandb-dir",
        str(tmp_path / "wb"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verify(tmp_path / "bundle")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*-run0042"))
    assert len(runs) == 1, "the artifact was not logged in the given run"
    record = (runs[0] / "run-run0042.wandb").read_bytes()
    # the run's log holds the artifact record: its name, type "bundle" and the bundle's file list
    assert b"bundle-synthetic-tiny" in record and b"\x06bundle" in record
    assert b"ranking/deepfm/model.pt2" in record and b"funnel-test" in record

    bad = subprocess.run(
        [
            *cmd[:7],
            "--retrieval",
            str(parts["retrieval"]),
            "--dataset",
            str(parts["world"]),
            "--out",
            str(tmp_path / "b2"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "--retrieval" in bad.stderr and "NAME=DIR" in bad.stderr
