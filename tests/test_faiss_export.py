"""FAISS export: exact search equals brute force, approximate indexes keep recall, artifacts are
complete, verifiable and never silently replace another model's index."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from data.synthetic import PRESETS, make_world
from serving.bundle import verify
from trainer.faiss_export import (
    IndexConfig,
    build_index,
    effective_nlist,
    evaluate_index,
    write_retrieval_artifact,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world_vectors() -> tuple[np.ndarray, np.ndarray]:
    """The `small` synthetic world's latent item and user vectors (5,000 items, category clusters)."""
    world = make_world(PRESETS["small"])
    return _unit(world.item_latent[1:]), _unit(world.user_latent[1:1001])


def test_flat_index_equals_brute_force_topk(world_vectors: tuple[np.ndarray, np.ndarray]) -> None:
    items, users = world_vectors
    index = build_index(items, IndexConfig(kind="flat", use_gpu="no"))
    scores, rows = index.search(users, 100)
    ref_scores, ref_rows = torch.topk(torch.from_numpy(users) @ torch.from_numpy(items).T, 100, dim=1)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-5)
    # rows may only differ where two items tie on the score
    differ = rows != ref_rows.numpy()
    assert np.all(np.abs(scores[differ] - ref_scores.numpy()[differ]) < 1e-5)
    assert differ.mean() < 0.01


def test_ivf_recall_at_configured_nprobe(world_vectors: tuple[np.ndarray, np.ndarray]) -> None:
    items, users = world_vectors
    cfg = IndexConfig(kind="ivf_flat", nlist=64, use_gpu="no")  # ~sqrt(5,000) lists; nprobe default 16
    index = build_index(items, cfg)
    assert faiss.extract_index_ivf(index).nprobe == cfg.nprobe == 16
    quality = evaluate_index(index, items, users, k=100)
    assert quality["recall@100"] >= 0.95, quality
    assert quality["qps"] > 0 and quality["exact_qps"] > 0


@pytest.mark.parametrize("kind", ["ivf_pq", "hnsw"])
def test_other_indexes_build_and_recall(world_vectors: tuple[np.ndarray, np.ndarray], kind: str) -> None:
    items, users = world_vectors
    index = build_index(items, IndexConfig(kind=kind, nlist=64, pq_m=8, use_gpu="no"))
    assert index.ntotal == len(items) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    recall = evaluate_index(index, items, users[:200], k=100)["recall@100"]
    assert recall >= (0.8 if kind == "ivf_pq" else 0.95), recall


def test_small_catalogs_lower_nlist_and_bad_configs_fail_clearly() -> None:
    assert effective_nlist(IndexConfig(nlist=256), 500) == 12
    assert effective_nlist(IndexConfig(nlist=256), 10) == 1
    x = _unit(np.random.default_rng(0).normal(size=(300, 16)))
    index = build_index(x, IndexConfig(kind="ivf_flat"))
    assert faiss.extract_index_ivf(index).nlist == 7
    with pytest.raises(ValueError, match="pq_m 5 must divide"):
        build_index(x, IndexConfig(kind="ivf_pq", pq_m=5))
    with pytest.raises(ValueError, match="pq_bits 10 needs at least 1024"):
        build_index(x, IndexConfig(kind="ivf_pq", pq_m=4, pq_bits=10))
    with pytest.raises(ValueError, match="index kind 'lsh'"):
        build_index(x, IndexConfig(kind="lsh"))
    with pytest.raises(ValueError, match="nprobe must be > 0"):
        build_index(x, IndexConfig(kind="ivf_flat", nprobe=0))
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="use_gpu=yes"):
            build_index(x, IndexConfig(use_gpu="yes"))


class _Encoder(torch.nn.Module):
    def forward(self, user_features: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(
            user_features.float() + history.float().mean(1, keepdim=True), dim=1
        )


def _artifact(out: Path, fingerprint: str, overwrite: bool = False, seed: int = 0) -> Path:
    x = _unit(np.random.default_rng(seed).normal(size=(400, 8)))
    ids = np.array([f"item{i}" for i in range(400)])
    batch = torch.export.Dim("batch", min=1, max=1024)
    encoder = torch.export.export(
        _Encoder(), (torch.ones(3, 8, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64)),
        dynamic_shapes={"user_features": {0: batch}, "history": {0: batch}},
    )  # fmt: skip
    meta = {"model_type": "test", "model_fingerprint": fingerprint, "data_fingerprint": "d" * 64}
    return write_retrieval_artifact(out, x, ids, IndexConfig(kind="hnsw"), query_encoder=encoder, meta=meta,
                                    overwrite=overwrite)  # fmt: skip


def test_artifact_layout_manifest_and_reload(tmp_path: Path) -> None:
    out = _artifact(tmp_path / "retrieval", "a" * 64)
    manifest = verify(out)
    assert manifest["kind"] == "retrieval"
    assert set(manifest["files"]) == {
        "index.faiss",
        "ids.npy",
        "item_embeddings.npy",
        "encoder.pt2",
        "meta.json",
    }
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dim"] == 8 and meta["metric"] == "ip" and meta["normalised"] is True
    assert meta["item_count"] == 400 and meta["faiss_version"] == faiss.__version__
    assert meta["index"]["kind"] == "hnsw" and 0.9 <= meta["ann"]["recall@100"] <= 1.0
    index = faiss.read_index(str(out / "index.faiss"))
    ids = np.load(out / "ids.npy")
    emb = np.load(out / "item_embeddings.npy")
    _, rows = index.search(emb[:5], 1)
    assert list(ids[rows[:, 0]]) == [f"item{i}" for i in range(5)]
    encoder = torch.export.load(out / "encoder.pt2").module()
    assert encoder(torch.ones(7, 8, dtype=torch.int64), torch.zeros(7, 5, dtype=torch.int64)).shape == (7, 8)


def test_refuses_to_replace_another_models_index(tmp_path: Path) -> None:
    out = _artifact(tmp_path / "retrieval", "a" * 64)
    before = (out / "index.faiss").read_bytes()
    with pytest.raises(FileExistsError, match="another model"):
        _artifact(out, "b" * 64, seed=1)
    assert (out / "index.faiss").read_bytes() == before and verify(out)
    _artifact(out, "a" * 64, seed=1)  # the same model may re-export in place
    assert (out / "index.faiss").read_bytes() != before
    _artifact(out, "b" * 64, overwrite=True, seed=2)
    assert json.loads((out / "meta.json").read_text())["model_fingerprint"] == "b" * 64
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not a retrieval artifact"):
        _artifact(tmp_path / "other", "a" * 64)
    assert not list(tmp_path.glob(".*tmp*")), "a failed export left a temporary directory"


def test_artifact_input_errors(tmp_path: Path) -> None:
    x = _unit(np.random.default_rng(0).normal(size=(50, 8)))
    with pytest.raises(ValueError, match="model_fingerprint"):
        write_retrieval_artifact(tmp_path / "a", x, np.arange(50), IndexConfig(), query_encoder=None,
                                 meta={"model_type": "t"})  # fmt: skip
    with pytest.raises(ValueError, match="item_ids has 49 rows"):
        write_retrieval_artifact(tmp_path / "a", x, np.arange(49), IndexConfig(), query_encoder=None,
                                 meta={"model_type": "t", "model_fingerprint": "f"})  # fmt: skip
    assert not (tmp_path / "a").exists()
