"""The sharded training engine, proven with real torchrun processes on gloo (2 CPU ranks).

What is guarded here: the plan really shards (table-wise and row-wise on both ranks); DeepFM learns
the synthetic world; N steps on 2 ranks equal N steps of plain unsharded training; a SIGKILLed run
resumes to the same weights; checkpoints move between world sizes; bad configs fail early.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from data.ctr import CTRDataModule
from data.shards import PreparedDataset
from models.deepfm import DeepFM, DeepFMConfig
from trainer.checkpoint import load_unsharded, save_unsharded

REPO = Path(__file__).resolve().parents[1]
MODEL = {"embedding_dim": 8, "dense_arch": [16], "deep_arch": [32, 16]}
SHARDING = {
    "tables": {
        "user": {"sharding_types": ["row_wise"]},
        "item": {"sharding_types": ["table_row_wise"]},
        "category": {"sharding_types": ["column_wise"]},
        "tags": {"sharding_types": ["table_wise"]},
    }
}


def torchrun(
    nproc: int,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *(extra or []),
        "-m",
        "trainer",
        *args,
    ]
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def write_config(path: Path, dataset: Path, run_dir: Path, **sections: dict) -> Path:
    cfg = {
        "model_name": "deepfm",
        "model": MODEL,
        "data": {"path": str(dataset), "batch_size": 256, "eval_batch_size": 2048, "seed": 0},
        "optimizer": {"name": "adam", "lr": 0.003},
        "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
        "sharding": SHARDING,
        "trainer": {
            "max_epochs": 2,
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "checkpoint_every_n_steps": 10,
        },
        "logger": {"kind": "csv"},
        "run_dir": str(run_dir),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(cfg.get(key), dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_rank_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-rank training run shared by several tests."""
    d = tmp_path_factory.mktemp("run2")
    cfg = write_config(d / "cfg.yaml", world, d / "run", trainer={"keep_checkpoints": -1})
    torchrun(2, ["--config", str(cfg)])
    return d


def model_for(dataset: Path) -> DeepFM:
    schema = CTRDataModule(dataset).schema
    cfg = DeepFMConfig(
        sparse_features={f.name: f.vocab for f in schema.sparse},
        num_dense=len(schema.dense),
        multi_valued=[f.name for f in schema.sparse if f.multi_valued],
        **MODEL,
    )
    return DeepFM(cfg)


def final_weights(run_dir: Path, dataset: Path) -> dict[str, torch.Tensor]:
    return load_unsharded(model_for(dataset), run_dir / "checkpoints" / "final.ckpt").state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(((k, (a[k] - b[k]).abs().max().item()) for k in a), key=lambda kv: kv[1])
    assert worst[1] <= atol, f"largest difference {worst[1]:.3g} in {worst[0]}"


@pytest.mark.slow
def test_two_rank_run_shards_both_ways_and_learns(two_rank_run: Path, world: Path) -> None:
    summary = json.loads((two_rank_run / "run" / "summary.json").read_text())
    plan = {row["table"]: row for row in summary["plan"]}
    assert plan["user"]["sharding_type"] == "row_wise" and plan["user"]["ranks"] == [0, 1]
    assert plan["item"]["sharding_type"] == "table_row_wise"
    assert plan["category"]["sharding_type"] == "column_wise"
    assert plan["tags"]["sharding_type"] == "table_wise"
    used_ranks = {r for row in summary["plan"] for r in row["ranks"]}
    assert used_ranks == {0, 1}
    assert all(b > 0 for b in summary["embedding_bytes_per_rank"])

    rows = list(csv.DictReader((two_rank_run / "run" / "logs" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.02, f"loss did not fall: {first:.4f} -> {last:.4f}"

    bayes = PreparedDataset(world).meta["ground_truth"]["bayes_auc"]["test"]
    auc = summary["metrics"]["test/auc"]
    # a clear fraction of what is learnable: the Bayes-optimal AUC's lift over chance
    assert auc - 0.5 >= 0.6 * (bayes - 0.5), f"test AUC {auc:.4f} vs Bayes-optimal {bayes:.4f}"
    assert auc <= bayes + 0.02


def reference_training(
    dataset: Path,
    steps: int,
    sparse_lr: float,
    dense_lr: float,
    init_dir: Path,
    lr_factors: Callable[[int], tuple[float, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Plain single-process training: unsharded EmbeddingBagCollection, torch SGD + Adam.

    ``lr_factors(step)``: the (sparse, dense) factors of the learning rates at that step.
    """
    torch.manual_seed(123)
    model = model_for(dataset)
    save_unsharded(model, init_dir)
    sparse = list(model.sparse_arch.parameters())
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    sgd = torch.optim.SGD(sparse, lr=sparse_lr)
    adam = torch.optim.Adam(dense, lr=dense_lr)
    loader = CTRDataModule(dataset, batch_size=256, seed=0).loader("train")
    for step, batch in zip(range(steps), loader, strict=False):
        if lr_factors is not None:
            sparse_factor, dense_factor = lr_factors(step)
            sgd.param_groups[0]["lr"] = sparse_lr * sparse_factor
            adam.param_groups[0]["lr"] = dense_lr * dense_factor
        loss = F.binary_cross_entropy_with_logits(
            model(batch.dense_features, batch.sparse_features), batch.labels
        )
        sgd.zero_grad()
        adam.zero_grad()
        loss.backward()
        sgd.step()
        adam.step()
    return model.state_dict()


@pytest.mark.slow
def test_two_rank_sharded_training_equals_unsharded(world: Path, tmp_path: Path) -> None:
    steps = 12
    reference = reference_training(world, steps, sparse_lr=0.5, dense_lr=0.003, init_dir=tmp_path / "init")
    cfg = write_config(
        tmp_path / "cfg.yaml",
        world,
        tmp_path / "run",
        sparse_optimizer={"name": "sgd", "lr": 0.5},
        trainer={
            "max_steps": steps,
            "max_epochs": 1,
            "checkpoint_every_n_steps": None,
            "test_after_fit": False,
        },
    )
    torchrun(2, ["--config", str(cfg), "--init-from", str(tmp_path / "init")])
    sharded = final_weights(tmp_path / "run", world)
    init = load_unsharded(model_for(world), tmp_path / "init").state_dict()
    moved = max((reference[k] - init[k]).abs().max().item() for k in reference)
    assert moved > 1e-3, "reference did not train: the comparison would prove nothing"
    assert_same_weights(sharded, reference, atol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_identical_weights(
    two_rank_run: Path, world: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", world, tmp_path / "run")
    proc = torchrun(
        2,
        ["--config", str(cfg), "--resume", "auto"],
        env={"FUNNEL_KILL_AT_STEP": "25", "FUNNEL_KILL_RANK": "1"},
        extra=["--max-restarts=1"],
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"] and "step=20" in summary["resumed_from"], proc.stderr[-3000:]
    reference = json.loads((two_rank_run / "run" / "summary.json").read_text())
    assert summary["global_step"] == reference["global_step"]
    assert_same_weights(
        final_weights(tmp_path / "run", world), final_weights(two_rank_run / "run", world), 1e-6
    )


@pytest.mark.slow
def test_two_rank_checkpoint_evaluates_and_resumes_on_one_rank(
    two_rank_run: Path, world: Path, tmp_path: Path
) -> None:
    run = two_rank_run / "run"
    reference = json.loads((run / "summary.json").read_text())["metrics"]
    cfg = write_config(tmp_path / "cfg.yaml", world, tmp_path / "eval")
    torchrun(1, ["--config", str(cfg), "--evaluate", str(run / "checkpoints" / "final.ckpt")])
    evaluated = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["metrics"]
    for key in ("test/auc", "test/logloss"):
        assert evaluated[key] == pytest.approx(reference[key], abs=1e-6)

    # resume the 2-rank run's step-20 checkpoint (optimizer state included) on 1 rank
    step20 = next((run / "checkpoints").glob("*step=20.ckpt"))
    cfg1 = write_config(tmp_path / "cfg1.yaml", world, tmp_path / "one")
    torchrun(1, ["--config", str(cfg1), "--resume", str(step20)])
    assert_same_weights(final_weights(tmp_path / "one", world), final_weights(run, world), 1e-5)


@pytest.mark.slow
def test_wandb_logger_runs_offline_and_records_the_plan(world: Path, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "cfg.yaml",
        world,
        tmp_path / "run",
        logger={"kind": "wandb", "project": "funnel-test"},
        trainer={"max_steps": 5, "max_epochs": 1, "checkpoint_every_n_steps": None, "test_after_fit": False},
    )
    torchrun(1, ["--config", str(cfg)], env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected one offline W&B run (no login needed)"
    tables = list(runs[0].glob("files/media/table/sharding_plan_*.table.json"))
    assert tables, "the sharding plan was not logged as a W&B table"
    plan = json.loads(tables[0].read_text())
    assert plan["columns"][:2] == ["table", "sharding_type"] and len(plan["data"]) >= 5


@pytest.mark.slow
def test_fp16_embedding_tables_train_and_load_unsharded(world: Path, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "cfg.yaml",
        world,
        tmp_path / "run",
        sharding={"embedding_precision": "fp16"},
        trainer={"max_steps": 20, "max_epochs": 1, "checkpoint_every_n_steps": None},
    )
    torchrun(2, ["--config", str(cfg)])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["test/auc"] > 0.55
    weights = final_weights(tmp_path / "run", world)
    assert weights["sparse_arch.embedding_bags.user.weight"].abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_data_parallel_sequence_tables_look_up_one_row_per_id_on_cpu(precision: str) -> None:
    """A data-parallel ``EmbeddingCollection`` on CPU (the dense kernel, trained by the dense optimizer):
    FBGEMM's CPU dense lookup pools every bag, so without :func:`exact_cpu_unpooled_lookups` the
    lookup fails; with it, each id gets its own table row and the gradients land on those rows,
    for two tables and three features (two of them on one table) in one lookup group."""
    import tempfile

    import torch.distributed as dist
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv

    from trainer.sharding import EMBEDDING_PRECISIONS, exact_cpu_unpooled_lookups, sharders

    tables = [
        EmbeddingConfig(name="item", num_embeddings=11, embedding_dim=4, feature_names=["seq", "out"]),
        EmbeddingConfig(name="tag", num_embeddings=7, embedding_dim=4, feature_names=["tag"]),
    ]
    for table in tables:
        table.data_type = EMBEDDING_PRECISIONS[precision]
    kjt = KeyedJaggedTensor(
        keys=["seq", "out", "tag"],
        values=torch.tensor([1, 2, 10, 3, 3, 5, 6]),
        lengths=torch.tensor([2, 1, 1, 2, 0, 1]),  # a batch of 2 per feature, an empty bag, a repeated id
    )
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")

    def build() -> DistributedModelParallel:
        torch.manual_seed(0)
        ec = EmbeddingCollection(tables=tables, device=torch.device("meta"))
        dp = ParameterConstraints(sharding_types=["data_parallel"])
        planner = EmbeddingShardingPlanner(Topology(world_size=1, compute_device="cpu"),
                                           constraints={"item": dp, "tag": dp})  # fmt: skip
        plan = planner.collective_plan(ec, sharders(), dist.group.WORLD)
        assert {p.sharding_type for p in plan.plan[""].values()} == {"data_parallel"}  # type: ignore[union-attr]
        env = ShardingEnv.from_process_group(dist.group.WORLD)
        cpu = torch.device("cpu")
        return DistributedModelParallel(ec, env=env, device=cpu, plan=plan, sharders=sharders())

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            stock = build()
            with pytest.raises(RuntimeError):
                stock(kjt).wait()["seq"].values()  # FBGEMM pooled: one row per bag, not per id
            dmp = build()
            assert exact_cpu_unpooled_lookups(dmp) == 1
            out = dmp(kjt).wait()
            weights = {n.split(".")[1]: p for n, p in dmp.module.named_parameters()}
            plain = {name: w.detach().clone().requires_grad_() for name, w in weights.items()}
            loss = torch.zeros(())
            expected_loss = torch.zeros(())
            for feature, table in (("seq", "item"), ("out", "item"), ("tag", "tag")):
                ids = kjt[feature].values()
                got = out[feature].values()
                assert got.dtype == torch.float32, feature  # FBGEMM's output dtype, whatever the storage
                assert torch.equal(got, weights[table][ids].detach().float()), feature
                scale = torch.arange(1.0, got.shape[0] * 4 + 1).view(-1, 4)
                loss = loss + (got * scale).sum()
                expected_loss = expected_loss + (plain[table][ids].float() * scale).sum()
            loss.backward()
            expected_loss.backward()
            for name, w in weights.items():
                assert w.grad is not None and w.grad.abs().sum() > 0, name
                torch.testing.assert_close(w.grad, plain[name].grad, rtol=0, atol=0)
        finally:
            dist.destroy_process_group()
