"""Bad configurations fail before training, with a message that says what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data.ctr import CTRSchema
from data.shards import PreparedDataset
from models.deepfm import DeepFM, DeepFMConfig
from trainer.config import load_config
from trainer.sharding import ConfigError, ShardingConfig, TableSharding, make_planner, plan_sharding

REPO = Path(__file__).resolve().parents[1]


def big_model() -> DeepFM:
    cfg = DeepFMConfig(sparse_features={"user": 3_000_000, "item": 1000}, num_dense=0, embedding_dim=60)
    return DeepFM(cfg, device=torch.device("meta"))


def test_unknown_config_key_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"max_epoch": 3}}))
    with pytest.raises(ConfigError, match=r"trainer: unknown key\(s\) \['max_epoch'\]"):
        load_config(path)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["trainer.max_epochs"])


def test_unknown_sharding_type_and_table() -> None:
    with pytest.raises(ConfigError, match="unknown sharding type"):
        ShardingConfig(sharding_types=["row_wize"])
    cfg = ShardingConfig(tables={"usr": TableSharding(sharding_types=["row_wise"])})
    with pytest.raises(ConfigError, match=r"unknown table\(s\) \['usr'\].*'user'"):
        make_planner(big_model(), cfg, world_size=2, local_world_size=2, device_type="cpu")


def test_unknown_feature_is_refused(world: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['usr'\].*has sparse features"):
        CTRSchema.from_dataset(PreparedDataset(world), ["user", "usr"])


def test_table_larger_than_every_rank_with_only_table_wise_fails_early() -> None:
    # 3M x 64 fp32 = 0.72 GiB; each rank may hold 0.5 GiB
    cfg = ShardingConfig(ddr_cap_gb=0.5, tables={"user": TableSharding(sharding_types=["table_wise"])})
    with pytest.raises(ConfigError, match=r"table 'user'.*larger than one rank's DDR cap.*allow row_wise"):
        plan_sharding(big_model(), cfg, world_size=2, local_world_size=2, device_type="cpu")
    # the same table fits once it may be split across ranks
    cfg.tables["user"] = TableSharding(sharding_types=["row_wise"])
    plan = plan_sharding(big_model(), cfg, world_size=2, local_world_size=2, device_type="cpu")
    user_plan = plan.plan["sparse_arch"]["user"]  # type: ignore[index]
    assert user_plan.sharding_type == "row_wise" and sorted(user_plan.ranks) == [0, 1]


def test_trainer_cli_reports_config_errors_with_exit_code_2(world: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"data": {"path": str(world), "features": ["user", "nope"]}, "run_dir": str(tmp_path)})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error" in proc.stderr and "'nope'" in proc.stderr


@pytest.mark.parametrize(
    ("settings", "device", "message"),
    [
        ({"name": "adam"}, "cpu", "sparse_optimizer.name adam: FBGEMM's CPU kernels have no fused Adam"),
        ({"weight_decay": 1e-4}, "cpu", r"sparse_optimizer.weight_decay 0.0001: .*CPU kernels ignore it"),
        ({"name": "sgd", "weight_decay": 1e-4}, "cuda", "sgd has none"),
    ],
)
def test_sparse_optimizer_settings_the_kernels_would_ignore_are_refused(
    settings: dict[str, object], device: str, message: str
) -> None:
    from trainer.strategy import SparseOptimizerConfig

    with pytest.raises(ConfigError, match=message):
        SparseOptimizerConfig(**settings).check(device)  # type: ignore[arg-type]


def test_row_wise_adagrad_weight_decay_reaches_the_cuda_kernel_as_l2() -> None:
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    from trainer.strategy import SparseOptimizerConfig

    cfg = SparseOptimizerConfig(weight_decay=1e-4)
    cfg.check("cuda")
    assert cfg.fused_params() == {"weight_decay_mode": WeightDecayMode.L2}
    assert SparseOptimizerConfig().fused_params() == {}


def test_fbgemm_cpu_kernels_ignore_weight_decay() -> None:
    """The fact behind refusing sparse weight decay on CPU: if a later FBGEMM applies it, allow it."""
    from launch.gpu_check import weight_decay_applied

    assert not weight_decay_applied("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FBGEMM CUDA kernels")
def test_fbgemm_cuda_row_wise_adagrad_applies_weight_decay() -> None:
    from launch.gpu_check import weight_decay_applied

    assert weight_decay_applied("cuda")


def test_pipeline_on_and_off_survive_yaml_booleans(tmp_path: Path) -> None:
    assert load_config(None, ["trainer.pipeline=on"]).trainer.pipeline == "on"
    assert load_config(None, ["trainer.pipeline=off"]).trainer.pipeline == "off"
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  pipeline: on\n")
    assert load_config(path).trainer.pipeline == "on"


def test_dense_optimizer_betas_reach_adam_and_are_checked() -> None:
    assert load_config(None).optimizer.betas == (0.9, 0.999)
    assert load_config(None, ["optimizer.betas=[0.9, 0.98]"]).optimizer.betas == (0.9, 0.98)
    for bad in ("0.9", "[0.9]", "[0.9, 1.0]", "[0.9, true]", "[0.9, -0.1]", "half"):
        with pytest.raises(ConfigError, match=r"optimizer.betas must be two numbers in \[0, 1\)"):
            load_config(None, [f"optimizer.betas={bad}"])


def test_lr_schedule_is_checked_and_names_the_field() -> None:
    from trainer.config import LrScheduleConfig
    from trainer.retrieval import build_two_tower

    assert load_config(None).lr_schedule == LrScheduleConfig(decay="constant", decay_to=0.0)
    cfg = load_config(None, ["lr_schedule.decay=cosine", "lr_schedule.decay_to=1"]).lr_schedule
    assert cfg == LrScheduleConfig(decay="cosine", decay_to=1.0) and isinstance(cfg.decay_to, float)
    with pytest.raises(ConfigError, match=r"lr_schedule.decay 'linear': choose constant or cosine"):
        load_config(None, ["lr_schedule.decay=linear"])
    for bad in ("1.5", "-0.1", "half", "true", "null"):
        with pytest.raises(ConfigError, match=r"lr_schedule.decay_to must be a number in \[0, 1\]"):
            load_config(None, ["lr_schedule.decay=cosine", f"lr_schedule.decay_to={bad}"])
    with pytest.raises(ConfigError, match=r"lr_schedule: unknown key\(s\) \['warmup_steps'\]"):
        load_config(None, ["lr_schedule.warmup_steps=10"])  # the warmup stays optimizer.warmup_steps
    # the two-tower's own decay moved to the engine: the old key says where
    old = load_config(None, ["model_name=two_tower", "model.lr_decay_to=0.0"])
    moved = r"model.lr_decay_to .*lr_schedule: \{decay: cosine, decay_to: 0.0\} at the top level"
    with pytest.raises(ConfigError, match=moved):
        build_two_tower(old)
