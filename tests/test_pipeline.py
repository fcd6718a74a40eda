"""TorchRec's sparse-dist train pipeline inside Lightning (``trainer.pipeline``), on 2 gloo ranks.

On CPU the pipeline creates no streams, so it must train exactly like the plain loop: same weights
bit for bit, through mid-epoch validation (the pipeline is closed and re-opened), gradient
accumulation and clipping (Lightning keeps backward and the dense step), and a SIGKILL + restart
(the data position counts trained batches, not the ones the pipeline fetched ahead). The CUDA
defaults (pipeline + bf16 autocast) also run here, on CPU autocast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_engine import assert_same_weights, final_weights, torchrun, write_config

LOOP = {
    "max_epochs": 2,
    "val_check_interval": 0.5,
    "accumulate_grad_batches": 2,
    "gradient_clip_val": 0.05,
    "checkpoint_every_n_steps": 10,
    "keep_checkpoints": -1,
}


@pytest.fixture(scope="module")
def plain_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plain")
    cfg = write_config(d / "cfg.yaml", world, d / "run", trainer={**LOOP, "pipeline": "off"})
    torchrun(2, ["--config", str(cfg)])
    return d / "run"


@pytest.mark.slow
def test_pipelined_training_equals_plain_loop(plain_run: Path, world: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", world, tmp_path / "run", trainer={**LOOP, "pipeline": "on"})
    proc = torchrun(2, ["--config", str(cfg)])
    assert "dataloader_iter" in proc.stderr, "the pipelined training_step was not used"
    piped = json.loads((tmp_path / "run" / "summary.json").read_text())
    plain = json.loads((plain_run / "summary.json").read_text())
    assert piped["global_step"] == plain["global_step"] > 0
    for key in ("val/auc", "test/auc", "test/logloss"):
        assert piped["metrics"][key] == pytest.approx(plain["metrics"][key], abs=1e-7), key
    assert_same_weights(final_weights(tmp_path / "run", world), final_weights(plain_run, world), 0.0)


@pytest.mark.slow
def test_pipelined_run_killed_mid_epoch_resumes_to_the_same_weights(
    plain_run: Path, world: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", world, tmp_path / "run", trainer={**LOOP, "pipeline": "on"})
    proc = torchrun(
        2,
        ["--config", str(cfg), "--resume", "auto"],
        env={"FUNNEL_KILL_AT_STEP": "25", "FUNNEL_KILL_RANK": "0"},
        extra=["--max-restarts=1"],
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"] and "step=20" in summary["resumed_from"], proc.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "run", world), final_weights(plain_run, world), 1e-6)


@pytest.mark.slow
def test_bf16_autocast_runs_the_dense_part_in_bf16_through_the_pipeline(
    plain_run: Path, world: Path, tmp_path: Path
) -> None:
    # the CUDA default (pipeline + bf16-mixed), run on CPU: autocast must reach the dense layers
    # called inside the pipeline (weights differ from fp32) and training must be as good
    trainer = {**LOOP, "pipeline": "on", "precision": "bf16-mixed"}
    cfg = write_config(tmp_path / "cfg.yaml", world, tmp_path / "run", trainer=trainer)
    torchrun(2, ["--config", str(cfg)])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "bf16-mixed" and summary["pipelined"]
    bf16, fp32 = final_weights(tmp_path / "run", world), final_weights(plain_run, world)
    assert max((bf16[k] - fp32[k]).abs().max().item() for k in fp32) > 1e-4, "autocast changed nothing"
    plain = json.loads((plain_run / "summary.json").read_text())["metrics"]
    assert summary["metrics"]["test/auc"] == pytest.approx(plain["test/auc"], abs=0.01)
