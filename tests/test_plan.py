"""`funnel plan` (TorchRec's planner as a dry run for clusters we do not have) and tables bigger than
one rank: planned row-wise, trained on 2 CPU ranks, checkpoint read back into a plain module."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data.ctr import CTRDataModule
from launch.cli import main as funnel_main
from launch.plan_cmd import Cluster, compress_ranks, plan_cluster
from models.deepfm import DeepFM, DeepFMConfig
from trainer.checkpoint import load_unsharded
from trainer.config import load_config
from trainer.metrics import binary_auc
from trainer.sharding import GB, ConfigError

REPO = Path(__file__).resolve().parents[1]
CRITEO_1TB = REPO / "configs" / "deepfm_criteo1tb.yaml"
H200 = ["--hbm-gb", "141", "--ddr-gb", "2048", "--compute-device", "cuda"]


def plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = funnel_main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------------
# The Criteo-1TB config on H200 clusters
# --------------------------------------------------------------------------------------------------


def test_criteo_1tb_config_has_the_mlperf_tables():
    model = yaml.safe_load(CRITEO_1TB.read_text())["model"]
    rows = list(model["sparse_features"].values())
    assert len(rows) == 26 and max(rows) == 40_000_000 and model["embedding_dim"] == 128
    # MLPerf DLRM v2: five tables hit the 40M cap; 204,184,588 rows in all
    assert rows.count(40_000_000) == 5 and sum(rows) == 204_184_588


@pytest.mark.parametrize("world", [8, 64])
def test_criteo_1tb_plans_for_h200_clusters(capsys: pytest.CaptureFixture[str], world: int) -> None:
    code, out, err = plan(
        capsys,
        "--config",
        str(CRITEO_1TB),
        "--world-size",
        str(world),
        "--local-world-size",
        "8",
        *H200,
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["cluster"] == {
        "world_size": world, "local_world_size": 8, "nodes": world // 8, "compute_device": "cuda",
        "hbm_gb_per_rank": 141.0, "ddr_gb_per_rank": 256.0,
    }  # fmt: skip
    declared = yaml.safe_load(CRITEO_1TB.read_text())["model"]["sparse_features"]
    tables = {t["table"]: t for t in report["tables"]}
    assert {n: (t["rows"], t["dim"]) for n, t in tables.items()} == {n: (r, 132) for n, r in declared.items()}
    assert report["totals"]["weights_gb"] == pytest.approx(204_184_588 * 132 * 4 / GB, abs=0.01)
    allowed = set(report["sharding_types"])
    for t in tables.values():
        assert t["sharding_type"] in allowed and t["compute_kernel"]
        assert t["ranks"] and all(0 <= r < world for r in t["ranks"])
        assert t["perf_ms"] > 0
        # every table is placed whole: its shards' storage covers its weights
        assert t["hbm_gb"] + t["ddr_gb"] >= t["weights_gb"] - 1e-3
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world))
    usable = 1 - report["reservation"]["hbm_fraction"]
    for r in ranks:
        assert r["hbm_gb"] <= r["hbm_cap_gb"] * usable + 1e-3, r
        assert r["ddr_gb"] <= r["ddr_cap_gb"] + 1e-3, r
    # per-rank use = the tables' shards + TorchRec's per-rank reservation for dense weights and KJTs
    res = report["reservation"]
    per_rank_reserved = res["dense_hbm_gb"] + res["kjt_hbm_gb"]
    assert sum(r["hbm_gb"] for r in ranks) == pytest.approx(
        sum(t["hbm_gb"] for t in tables.values()) + world * per_rank_reserved, abs=0.01 * world
    )
    estimate = report["estimate"]
    assert (
        estimate["max_rank_perf_ms"] == pytest.approx(max(r["perf_ms"] for r in ranks))
        and estimate["max_rank_perf_ms"] > 0
    )
    assert estimate["critical_path_ms"]["total"] > 0
    used_nodes = {r // 8 for t in tables.values() for r in t["ranks"]}
    assert used_nodes == set(range(world // 8)), "the plan leaves whole nodes empty"


def test_plan_text_report_names_tables_ranks_and_perf() -> None:
    # a real process: the report is all a user sees, without TorchRec's and FBGEMM's INFO chatter
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "plan", "--config", str(CRITEO_1TB), "--world-size", "64", *H200],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "64 cuda ranks = 8 node(s) x 8" in out
    for name in ("C1", "C26"):
        assert any(line.startswith(f"{name} ") for line in out.splitlines()), name
    assert "per rank" in out and "perf estimate" in out and "busiest rank" in out
    assert "Successfully loaded" not in out + proc.stderr  # fbgemm_gpu's import log
    assert "GreedyPerfPartitioner" not in out + proc.stderr  # the planner's INFO log
    assert "Planner Statistics" not in out  # TorchRec's own table only with --torchrec-stats


def test_plan_prints_torchrec_stats_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(capsys, "--config", str(CRITEO_1TB), "--world-size", "8", *H200, "--torchrec-stats")
    assert code == 0
    assert "--- Planner Statistics ---" in out and "Critical Path" in out


def test_no_plan_when_a_table_is_too_big_for_table_wise(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = plan(
        capsys, "--config", str(CRITEO_1TB), "--world-size", "8", "--hbm-gb", "1",
        "--set", "sharding.sharding_types=[table_wise]",
    )  # fmt: skip
    assert code == 2 and not out
    assert "table 'C1'" in err and "larger than one rank's HBM cap (1.00 GiB)" in err
    assert "allow row_wise" in err


def test_no_plan_when_the_cluster_is_too_small(capsys: pytest.CaptureFixture[str]) -> None:
    # row-wise is allowed, but HBM only (fused kernel, no UVM): 8 x 4 GiB cannot hold 100 GiB
    code, out, err = plan(
        capsys, "--config", str(CRITEO_1TB), "--world-size", "8", "--hbm-gb", "4",
        "--set", "sharding.compute_kernels=[fused]",
    )  # fmt: skip
    assert code == 2 and not out
    assert "no sharding plan fits 8 cuda rank(s)" in err and "insufficient storage" in err
    assert "Global storage requirement for model parallel" in err
    assert "raise the memory caps" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--world-size", "12", "--local-world-size", "8"], "must divide --world-size 12"),
        (["--world-size", "0"], "--world-size must be >= 1"),
        (["--hbm-gb", "-1"], "--hbm-gb must be > 0"),
        (["--set", "model.num_dense=null"], "model.num_dense"),
        (["--set", "model.sparse_features={C1: 0}"], "rows must be positive integers"),
        (["--model", "nope"], "model_name 'nope'"),
        (["--set", "model.embedding_dim=10"], "model: embedding_dim 10 must be a multiple of 4"),
        (["--set", "sharding.sharding_types=[diagonal]"], "unknown sharding type"),
    ],
)
def test_plan_rejects_bad_input(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, _, err = plan(capsys, "--config", str(CRITEO_1TB), *args)
    assert code == 2
    assert message in err


def test_plan_without_dataset_or_declared_shapes_says_what_to_do(capsys, tmp_path: Path) -> None:
    code, _, err = plan(
        capsys, "--config", str(REPO / "configs" / "deepfm_synthetic.yaml"), "--compute-device", "cpu",
        "--set", f"data.path={tmp_path / 'absent'}",
    )  # fmt: skip
    assert code == 2
    assert "data.path" in err and "model.sparse_features" in err


def test_compress_ranks():
    assert compress_ranks([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert compress_ranks([3]) == "3"


# --------------------------------------------------------------------------------------------------
# A table bigger than one rank's memory: row-wise on 2 CPU ranks
# --------------------------------------------------------------------------------------------------

# 80,001 users x (60 + 4) fp32 = 19.5 MiB: more than the 16.4 MiB cap of one rank, while half of it
# plus the other tables and TorchRec's per-rank reservation fits.
DDR_CAP_GB = 0.016
MODEL = {"embedding_dim": 60, "dense_arch": [16], "deep_arch": [32, 16]}


@pytest.fixture(scope="module")
def many_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.synthetic import PRESETS, generate

    config = dataclasses.replace(
        PRESETS["tiny"], name="synthetic-many-users", num_users=80_000, num_interactions=240_000
    )
    return generate(config, tmp_path_factory.mktemp("data") / "many-users")


def big_table_config(path: Path, dataset: Path, run_dir: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "model_name": "deepfm",
                "model": MODEL,
                "data": {"path": str(dataset), "batch_size": 512, "eval_batch_size": 4096, "seed": 0},
                "optimizer": {"name": "adam", "lr": 0.003},
                "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
                # the planner decides; nothing pins the user table to row-wise
                "sharding": {"compute_device": "cpu", "ddr_cap_gb": DDR_CAP_GB,
                             "sharding_types": ["table_wise", "row_wise"]},
                "trainer": {"max_epochs": 1, "log_every_n_steps": 5, "enable_progress_bar": False},
                "logger": {"kind": "csv"},
                "run_dir": str(run_dir),
            }
        )
    )  # fmt: skip
    return path


def funnel(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """`funnel ARGS` in its own session, so that a timeout also ends torchrun and its workers."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "launch", *args]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"funnel {' '.join(args)} timed out:\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_user_table_exceeds_one_rank_and_table_wise_alone_cannot_place_it(many_users: Path, tmp_path: Path):
    cfg = big_table_config(tmp_path / "cfg.yaml", many_users, tmp_path / "run")
    user_bytes = 80_001 * (MODEL["embedding_dim"] + 4) * 4
    assert user_bytes > DDR_CAP_GB * GB  # the premise of this section
    table_wise = load_config(cfg, ["sharding.sharding_types=[table_wise]"])
    with pytest.raises(
        ConfigError, match=r"table 'user' .* is larger than one rank's DDR cap .* allow row_wise"
    ):
        plan_cluster(table_wise, Cluster(2, 2, "cpu"))
    report = plan_cluster(load_config(cfg), Cluster(2, 2, "cpu"))
    user = next(t for t in report["tables"] if t["table"] == "user")
    assert (user["sharding_type"], user["ranks"]) == ("row_wise", [0, 1])


@pytest.mark.slow
def test_table_wise_only_run_fails_before_training(many_users: Path, tmp_path: Path) -> None:
    cfg = big_table_config(tmp_path / "cfg.yaml", many_users, tmp_path / "run")
    proc = funnel("train", "deepfm", "--config", str(cfg), "--nproc-per-node", "2",
                  "--set", "sharding.sharding_types=[table_wise]")  # fmt: skip
    assert proc.returncode != 0
    assert "funnel: config error: table 'user'" in proc.stderr and "allow row_wise" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_table_bigger_than_a_rank_trains_row_wise_and_round_trips(many_users: Path, tmp_path: Path) -> None:
    cfg = big_table_config(tmp_path / "cfg.yaml", many_users, tmp_path / "run")
    proc = funnel("train", "deepfm", "--config", str(cfg), "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    plan_rows = {row["table"]: row for row in summary["plan"]}
    assert plan_rows["user"]["sharding_type"] == "row_wise" and plan_rows["user"]["ranks"] == [0, 1]
    # each rank really holds less than the cap, the whole table being more than it
    assert all(0 < b < DDR_CAP_GB * GB for b in summary["embedding_bytes_per_rank"])
    # the dry run predicts the real run's plan
    predicted = plan_cluster(load_config(cfg), Cluster(2, 2, "cpu"))
    assert {t["table"]: (t["sharding_type"], t["ranks"]) for t in predicted["tables"]} == {
        name: (row["sharding_type"], row["ranks"]) for name, row in plan_rows.items()
    }

    # the sharded checkpoint loads into one plain, unsharded DeepFM that scores the test split alike
    dm = CTRDataModule(many_users, batch_size=512, eval_batch_size=4096)
    schema = dm.schema
    model = DeepFM(
        DeepFMConfig(
            sparse_features={f.name: f.vocab for f in schema.sparse},
            num_dense=len(schema.dense),
            multi_valued=[f.name for f in schema.sparse if f.multi_valued],
            **MODEL,
        )
    )
    load_unsharded(model, tmp_path / "run" / "checkpoints" / "final.ckpt")
    assert tuple(model.sparse_arch.embedding_bags["user"].weight.shape) == (80_001, 64)
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in dm.loader("test"):
            logits.append(model(batch.dense_features, batch.sparse_features))
            labels.append(batch.labels)
    auc = binary_auc(torch.cat(logits), torch.cat(labels))
    assert auc == pytest.approx(summary["metrics"]["test/auc"], abs=1e-4)
    assert auc > 0.55  # trained, not a fresh initialisation


def test_declared_table_sizes_give_way_to_the_prepared_dataset(many_users: Path, tmp_path: Path) -> None:
    cfg = big_table_config(tmp_path / "cfg.yaml", many_users, tmp_path / "run")
    declared = load_config(cfg, ["model.sparse_features={user: 7, item: 9}", "model.num_dense=3"])
    report = plan_cluster(declared, Cluster(2, 2, "cpu", ddr_gb_per_node=2.0))
    rows = {t["table"]: t["rows"] for t in report["tables"]}
    assert rows["user"] == 80_001 and rows["item"] == 501 and len(rows) > 2
