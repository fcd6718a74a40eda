"""Ranking artifacts: a sharded DeepFM checkpoint -> torch.export program + safetensors + feature spec.

Guarded here: the fp32 artifact, loaded the way a server loads it, scores held-out rows exactly as
the training-time model does (<= 1e-5) and reproduces the sharded run's own test AUC; the batch
dimension is dynamic and padding of multi-valued features is excluded from the pooling; fp16 and
int8 tables shrink the weights at a measured, small AUC cost; the manifest carries provenance;
and loading refuses tampered files and archives that would need unpickling.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import torchrun, write_config

from data.ctr import CTRBatchBuilder, CTRDataModule
from data.prepare import hash_index
from data.shards import PreparedDataset, dataset_fingerprint
from serving.bundle import BundleError, verify
from serving.features import FieldEncoder, IdLookup
from serving.pt2 import check_archive, load_program, save_program
from serving.ranking import RankingModel
from trainer.config import load_config
from trainer.export_ranking import (
    export_ranking,
    load_training_model,
    max_lengths,
    padded_inputs,
    quantize_rowwise_int8,
)

REPO = Path(__file__).resolve().parents[1]


# -- unit level -------------------------------------------------------------------------------------
def test_rowwise_int8_error_is_within_half_a_step() -> None:
    w = torch.randn(50, 12) * torch.logspace(-3, 1, 50).unsqueeze(1)
    w[7] = 0.25  # a constant row has no range and must come back exactly
    q, scale, bias = quantize_rowwise_int8(w)
    assert q.dtype == torch.uint8 and scale.shape == bias.shape == (50, 1)
    restored = q.float() * scale + bias
    assert torch.all((restored - w).abs() <= scale / 2 + 1e-6)
    assert torch.equal(restored[7], w[7])


def test_serving_encodes_hashed_fields_as_training_did() -> None:
    text = np.array(["a", "user-17", "Zürich", "東京", "", "x" * 40])
    enc = FieldEncoder("f", buckets=97)
    assert enc.encode(text.tolist()[:4]).tolist() == hash_index(text[:4], 97).tolist()
    assert enc.encode([5, 2**40]).tolist() == hash_index(np.array([5, 2**40]), 97).tolist()
    assert enc.encode([None, ""]).tolist() == [0, 0]  # missing -> the OOV index


def test_id_lookup_maps_raw_ids_and_unknowns_to_zero() -> None:
    strings = IdLookup(np.array(["u3", "u1", "u2"]))
    assert strings.lookup(["u1", "u3", "nope", 7]).tolist() == [2, 1, 0, 0]
    ints = IdLookup(np.array([30, 10, 20], dtype=np.int64))
    assert ints.lookup([10, "20", True, 2**80, "x", 30]).tolist() == [2, 3, 0, 0, 0, 1]
    assert strings.raw_ids(np.array([2, 3])) == ["u1", "u2"]
    # searched in the map's own dtype: a longer string or a wider integer must not match once cast
    assert strings.lookup(["u1x", "u2", "u3" + "\u00e9" * 9]).tolist() == [0, 3, 0]
    narrow = IdLookup(np.array([30, 10, 20], dtype=np.int32))
    assert narrow.lookup([10, 2**32 + 10, -(2**40), 20]).tolist() == [2, 0, 0, 3]


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(10, 3))
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.table[ids]).squeeze(1)


class _Exploit:
    """Unpickling this would run code (create a marker file): the loader must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _rewrite(src: Path, dst: Path, change: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            inner = name.split("/", 1)[1]
            zout.writestr(name, change.pop(inner, zin.read(name)))
        for inner, data in change.items():
            zout.writestr(f"{zin.namelist()[0].split('/')[0]}/{inner}", data)


def test_program_weights_live_in_safetensors_and_pickles_are_refused(tmp_path: Path) -> None:
    model = _Tiny().eval()
    ids = torch.tensor([1, 2, 3, 9])
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (ids,), dynamic_shapes=({0: batch},), strict=False)
    save_program(tmp_path, program)
    loaded = load_program(tmp_path / "model.pt2", tmp_path / "weights.safetensors")
    assert torch.allclose(loaded(torch.tensor([4, 5])), model(torch.tensor([4, 5])))
    assert (tmp_path / "model.pt2").stat().st_size < 40_000  # graph only: the weights are not in it
    with pytest.raises(BundleError, match="no weights"):
        load_program(tmp_path / "model.pt2")

    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "model.pt2") as z:
        cfg_name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(cfg_name))
    for entry in config["config"].values():
        entry["use_pickle"] = True
    cases = {
        "pickled_weights.pt2": {cfg_name.split("/", 1)[1]: json.dumps(config).encode()},
        "pickled_inputs.pt2": {"data/sample_inputs/model.pt": pickle.dumps(_Exploit(marker))},
        "aot_library.pt2": {"data/aotinductor/model/model.so": b"\x7fELF"},
    }
    for name, change in cases.items():
        _rewrite(tmp_path / "model.pt2", tmp_path / name, dict(change))
        with pytest.raises(BundleError, match="pickled|weights_only|unexpected member"):
            check_archive(tmp_path / name)
        with pytest.raises(BundleError):
            load_program(tmp_path / name, tmp_path / "weights.safetensors")
    assert not marker.exists(), "a refused archive's pickle was executed"
    with pytest.raises(BundleError, match="not a .pt2"):
        (tmp_path / "garbage.pt2").write_bytes(b"not a zip")
        check_archive(tmp_path / "garbage.pt2")


# -- a real sharded checkpoint ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny world and a DeepFM trained on 2 gloo ranks (row-/column-/table-wise shards)."""
    from data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("export_ranking")
    world = prepare_synthetic(root / "tiny", "tiny", seed=0)
    cfg = write_config(
        root / "cfg.yaml", world, root / "run", trainer={"checkpoint_every_n_steps": None, "max_epochs": 2}
    )
    torchrun(2, ["--config", str(cfg)])
    return {
        "world": world,
        "config": cfg,
        "run": root / "run",
        "checkpoint": root / "run/checkpoints/final.ckpt",
        "root": root,
    }


@pytest.fixture(scope="module")
def artifacts(trained: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for precision in ("fp32", "fp16", "int8"):
        out[precision] = trained["root"] / f"ranking-{precision}"
        export_ranking(trained["checkpoint"], trained["config"], out[precision], precision)
    return out


def _held_out(world: Path, n: int = 512) -> np.ndarray:
    return PreparedDataset(world).split_rows("ctr", "test")[:n]


@pytest.mark.slow
def test_fp32_artifact_scores_equal_the_training_time_model(
    trained: dict[str, Path], artifacts: dict[str, Path]
) -> None:
    cfg = load_config(trained["config"])
    model, dm = load_training_model(cfg, trained["checkpoint"])
    rows = _held_out(trained["world"])
    batch = CTRBatchBuilder(dm.dataset, dm.schema)(rows)
    with torch.no_grad():
        reference = torch.sigmoid(model(batch.dense_features, batch.sparse_features)).numpy()
    artifact = RankingModel.load(artifacts["fp32"])
    dense, sparse = padded_inputs(dm.dataset, dm.schema, rows, max_lengths(dm.dataset, dm.schema))
    served = artifact.score(dense.numpy(), [s.numpy() for s in sparse])
    assert reference.std() > 0.02, "an untrained model would make the comparison meaningless"
    assert np.abs(served - reference).max() <= 1e-5
    # ... and on the whole test split it reproduces the AUC the sharded run measured itself
    summary = json.loads((trained["run"] / "summary.json").read_text())
    metrics = json.loads((artifacts["fp32"] / "manifest.json").read_text())["metrics"]["test"]
    assert metrics["rows"] == len(PreparedDataset(trained["world"]).split_rows("ctr", "test"))
    assert metrics["auc"] == pytest.approx(summary["metrics"]["test/auc"], abs=1e-6)
    assert metrics["max_abs_diff_vs_training_model"] <= 1e-5


@pytest.mark.slow
def test_batch_dimension_is_dynamic_and_padding_is_not_pooled(
    trained: dict[str, Path], artifacts: dict[str, Path]
) -> None:
    dm = CTRDataModule(trained["world"])
    widths = max_lengths(dm.dataset, dm.schema)
    artifact = RankingModel.load(artifacts["fp32"])
    rows = _held_out(trained["world"], 2000)
    assert len(rows) == 2000
    dense, sparse = padded_inputs(dm.dataset, dm.schema, rows, widths)
    full = artifact.score(dense.numpy(), [s.numpy() for s in sparse])
    for lo, hi in [(0, 1), (1, 4), (4, 1200), (1200, 2000)]:
        part = artifact.score(dense[lo:hi].numpy(), [s[lo:hi].numpy() for s in sparse])
        assert part.shape == (hi - lo,)
        np.testing.assert_allclose(part, full[lo:hi], atol=1e-6)
    # tags is multi-valued (mean-pooled): wider padding and a shorter width change nothing
    tags = [i for i, f in enumerate(dm.schema.sparse) if f.multi_valued]
    assert tags, "the tiny world has a multi-valued feature"
    padded = [np.pad(s.numpy(), ((0, 0), (0, 5))) if i in tags else s.numpy() for i, s in enumerate(sparse)]
    np.testing.assert_allclose(artifact.score(dense.numpy(), padded), full, atol=1e-6)


@pytest.mark.slow
def test_fp16_and_int8_tables_are_smaller_at_a_small_auc_cost(artifacts: dict[str, Path]) -> None:
    sizes, metrics = {}, {}
    for precision, path in artifacts.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["models"]["deepfm"]["precision"] == precision
        sizes[precision] = (path / "weights.safetensors").stat().st_size
        metrics[precision] = manifest["metrics"]["test"]
    assert sizes["fp16"] < 0.75 * sizes["fp32"]
    assert sizes["int8"] < sizes["fp16"]
    for precision in ("fp16", "int8"):
        m = metrics[precision]
        assert m["training_model_auc"] == pytest.approx(metrics["fp32"]["auc"], abs=1e-9)
        assert abs(m["auc_change"]) < 0.005, m
        assert 0 < m["max_abs_diff_vs_training_model"] < (0.01 if precision == "fp16" else 0.05)


@pytest.mark.slow
def test_manifest_and_feature_spec_describe_the_artifact(
    trained: dict[str, Path], artifacts: dict[str, Path], tmp_path: Path
) -> None:
    path = artifacts["fp32"]
    manifest = verify(path)
    assert manifest["kind"] == "ranking" and manifest["format_version"] == 1
    assert set(manifest["files"]) >= {
        "model.pt2",
        "weights.safetensors",
        "feature_spec.json",
        "idmaps/user.npy",
    }
    extra = manifest["extra"]
    assert extra["dataset"]["fingerprint"] == dataset_fingerprint(trained["world"])
    assert extra["training_config"]["model"] == load_config(trained["config"]).model
    assert extra["training_run_id"] == str(trained["run"].resolve())
    assert extra["training_metrics"]["test/auc"] > 0.6
    assert {"torch", "torchrec", "numpy", "python"} <= set(manifest["versions"])

    spec = json.loads((path / "feature_spec.json").read_text())
    sides = {f["name"]: f["side"] for f in spec["sparse"]}
    assert sides == {
        "user": "user",
        "age_bucket": "user",
        "gender": "user",
        "occupation": "user",
        "region": "user",
        "item": "item",
        "category": "item",
        "price_bucket": "item",
        "tags": "item",
    }
    dense = {f["name"]: f["side"] for f in spec["dense"]}
    assert dense == {
        "position": "context",
        "hour": "context",
        "is_weekend": "context",
        "session_depth": "context",
        "price": "item",
        "item_popularity": "item",
        "item_age": "item",
        "user_activity": "user",
    }
    ds = PreparedDataset(trained["world"])
    for name in ("user", "item", "tags"):
        assert np.array_equal(np.load(path / "idmaps" / f"{name}.npy"), ds.idmap(name))

    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(path, tampered)
    with open(tampered / "weights.safetensors", "r+b") as f:
        f.seek(-8, io.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(BundleError, match="checksum mismatch for weights.safetensors"):
        RankingModel.load(tampered)


@pytest.mark.slow
def test_cli_exports_and_names_bad_input(trained: dict[str, Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "launch", "export", "ranking", "--config", str(trained["config"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [
            *cmd,
            "--checkpoint",
            str(trained["checkpoint"]),
            "--out",
            str(tmp_path / "a"),
            "--precision",
            "int8",
            "--eval-rows",
            "300",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.loads(ok.stdout[ok.stdout.index("{") :])
    assert report["precision"] == "int8" and report["metrics"]["rows"] == 300
    bad = subprocess.run(
        [*cmd, "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "b")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "--checkpoint" in bad.stderr and not (tmp_path / "b").exists()
    exists = subprocess.run(
        [*cmd, "--checkpoint", str(trained["checkpoint"]), "--out", str(tmp_path / "a")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exists.returncode == 1 and "exists" in exists.stderr
