"""The engine's learning-rate schedule (``lr_schedule``), for the dense and the fused table optimizers.

The tables' FBGEMM optimizers step inside backward, out of reach of Lightning's schedulers, so the
proof is at the kernel: 2 sharded ranks with fused SGD (update = lr * factor * grad) train exactly
like plain torch SGD whose rate the test sets to the cosine factor of each step (the dense Adam to
warmup x cosine), and not like one whose table rate stays constant. The dense rate is also read
back from the checkpointed optimizer. A run
resumed mid-curve (on 1 rank, through the sparse-dist pipeline) continues it to the same weights.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_engine import assert_same_weights, final_weights, reference_training, torchrun, write_config

from models.deepfm import DeepFMConfig
from trainer.config import LrScheduleConfig
from trainer.ranking import DeepFMModule
from trainer.sharding import ConfigError

STEPS = 8
WARMUP = 3
SPARSE_LR, DENSE_LR = 0.5, 0.003


def cosine(step: int) -> float:
    """The expected decay to 0 over the run's ``STEPS`` optimizer steps, written out independently."""
    return 0.5 * (1 + math.cos(math.pi * step / STEPS))


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


def test_cosine_factor_falls_from_one_to_decay_to() -> None:
    cfg = LrScheduleConfig(decay="cosine", decay_to=0.1)
    factors = [cfg.factor(step, 10) for step in range(11)]
    assert factors[0] == 1.0 and factors[5] == pytest.approx(0.55) and factors[10] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert cfg.factor(15, 10) == pytest.approx(0.1)  # past the estimate (e.g. a longer resumed run)
    assert LrScheduleConfig(decay="constant", decay_to=0.1).factor(5, 10) == 1.0


def test_cosine_without_a_known_run_length_is_refused() -> None:
    config = DeepFMConfig(sparse_features={"user": 10}, num_dense=0)
    module = DeepFMModule(config, lr_schedule=LrScheduleConfig("cosine"))
    module.trainer = pl.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match=r"lr_schedule.decay cosine: .*set trainer.max_steps"):
        module.lr_factor(3)
    module.lr_schedule = LrScheduleConfig("constant")
    assert module.lr_factor(3) == 1.0


def _reference(world: Path, init_dir: Path, tables_decay: bool) -> dict[str, torch.Tensor]:
    """Plain torch training with the expected rates (the tables' rate constant unless ``tables_decay``)."""

    def factors(step: int) -> tuple[float, float]:
        return (cosine(step) if tables_decay else 1.0), warmup(step) * cosine(step)

    return reference_training(world, STEPS, SPARSE_LR, DENSE_LR, init_dir, lr_factors=factors)


def _config(d: Path, world: Path, name: str, **trainer: object) -> Path:
    return write_config(
        d / f"{name}.yaml",
        world,
        d / name,
        optimizer={"name": "adam", "lr": DENSE_LR, "warmup_steps": WARMUP},
        sparse_optimizer={"name": "sgd", "lr": SPARSE_LR},
        lr_schedule={"decay": "cosine", "decay_to": 0.0},
        trainer={
            "max_steps": STEPS,
            "max_epochs": 1,
            "checkpoint_every_n_steps": 1,
            "keep_checkpoints": -1,
            "log_every_n_steps": 1,
            "test_after_fit": False,
            **trainer,
        },
    )


def _logged_factors(run: Path) -> dict[int, float]:
    rows = csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/lr_factor"]) for r in rows if r.get("train/lr_factor")}


@pytest.fixture(scope="module")
def scheduled(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank DeepFM run of ``STEPS`` steps, warmup + cosine to 0, started from ``init``."""
    d = tmp_path_factory.mktemp("schedule")
    reference_training(world, 0, SPARSE_LR, DENSE_LR, init_dir=d / "init")  # writes the initial weights
    torchrun(2, ["--config", str(_config(d, world, "run")), "--init-from", str(d / "init")])
    return d


@pytest.mark.slow
def test_fused_table_and_dense_rates_follow_the_schedule(scheduled: Path, world: Path) -> None:
    run = scheduled / "run"
    sharded = final_weights(run, world)
    assert_same_weights(sharded, _reference(world, scheduled / "ref", tables_decay=True), atol=1e-5)
    # the control: the same run with the tables' rate left constant is far from what the kernels did
    constant = _reference(world, scheduled / "ctl", tables_decay=False)
    tables = [k for k in sharded if k.startswith("sparse_arch.")]
    assert max((sharded[k] - constant[k]).abs().max().item() for k in tables) > 1e-3

    # the dense optimizer's rate after k steps (what step k will use): warmup x decay, 0 at the end
    checkpoints = {int(p.stem.split("step=")[1]): p for p in (run / "checkpoints").glob("*step=*.ckpt")}
    assert sorted(checkpoints) == list(range(1, STEPS + 1))
    checkpoints[STEPS] = run / "checkpoints" / "final.ckpt"
    for step, path in checkpoints.items():
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        lr = state["optimizer_states"][0]["param_groups"][0]["lr"]
        assert lr == pytest.approx(DENSE_LR * warmup(step) * cosine(step), rel=1e-9, abs=1e-12), step
    assert lr == 0.0
    logged = _logged_factors(run)
    assert sorted(logged) == list(range(STEPS))
    assert all(logged[s] == pytest.approx(cosine(s), abs=1e-6) for s in logged)


@pytest.mark.slow
def test_resumed_pipelined_run_continues_the_curve(scheduled: Path, world: Path) -> None:
    """1 rank resumes the 2-rank run's step-4 checkpoint through the pipeline: same end weights."""
    mid = next((scheduled / "run" / "checkpoints").glob("*step=4.ckpt"))
    torchrun(1, ["--config", str(_config(scheduled, world, "resumed", pipeline="on")), "--resume", str(mid)])
    summary = json.loads((scheduled / "resumed" / "summary.json").read_text())
    assert summary["pipelined"] and summary["global_step"] == STEPS
    logged = _logged_factors(scheduled / "resumed")
    assert sorted(logged) == list(range(4, STEPS))
    assert all(logged[s] == pytest.approx(cosine(s), abs=1e-6) for s in logged)
    resumed = final_weights(scheduled / "resumed", world)
    assert_same_weights(resumed, final_weights(scheduled / "run", world), 1e-5)
