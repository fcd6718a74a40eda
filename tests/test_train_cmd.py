"""`funnel train`: the torchrun command it builds, and bad arguments failing before any process starts."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main as funnel_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "deepfm_synthetic.yaml")


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    """The printed command as argv (environment assignments first)."""
    assert funnel_main(["train", *args, "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("funnel train: ")
    return shlex.split(line.removeprefix("funnel train: "))


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, the trainer's arguments)."""
    start = argv.index("torch.distributed.run") + 1
    cut = argv.index("-m", start)
    return argv[start:cut], argv[cut:]


def test_one_node_is_standalone(capsys):
    argv = dry_run(capsys, "deepfm", "--config", CONFIG, "--nproc-per-node", "2")
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    torchrun, trainer = split(argv)
    assert torchrun == ["--nproc-per-node=2", "--standalone", "--max-restarts=0"]
    assert trainer == ["-m", "trainer", "--model", "deepfm", "--config", CONFIG]


def test_several_nodes_use_c10d_with_node_0_hosting_the_store(capsys):
    for node in (0, 1):
        argv = dry_run(
            capsys, "deepfm", "--config", CONFIG, "--nproc-per-node", "8", "--nnodes", "2",
            "--node-rank", str(node), "--rdzv-endpoint", "node-a:29500", "--max-restarts", "3",
            "--resume", "auto", "--set", "trainer.max_epochs=2", "--set", "data.batch_size=4096",
        )  # fmt: skip
        assert argv[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # see launch/train_cmd.MULTI_NODE_ENV
        torchrun, trainer = split(argv)
        assert torchrun == [
            "--nproc-per-node=8", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node-a:29500",
            "--rdzv-id=funnel-deepfm", f"--node-rank={node}",
            f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}", "--max-restarts=3",
        ]  # fmt: skip
        assert trainer == [
            "-m", "trainer", "--model", "deepfm", "--config", CONFIG, "--set", "trainer.max_epochs=2",
            "--set", "data.batch_size=4096", "--resume", "auto",
        ]  # fmt: skip


def test_without_node_rank_torchrun_decides_who_hosts(capsys):
    torchrun, _ = split(
        dry_run(capsys, "deepfm", "--config", CONFIG, "--nnodes", "4", "--rdzv-endpoint", "[::1]:29500",
                "--rdzv-id", "job-7")
    )  # fmt: skip
    assert "--rdzv-id=job-7" in torchrun and "--rdzv-endpoint=[::1]:29500" in torchrun
    assert not [a for a in torchrun if a.startswith(("--node-rank", "--rdzv-conf"))]


def test_default_processes_per_node_is_the_local_gpu_count(capsys):
    import torch

    torchrun, _ = split(dry_run(capsys, "deepfm", "--config", CONFIG))
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert torchrun[0] == f"--nproc-per-node={max(1, expected)}"


def test_evaluate_and_init_from_are_passed_on(capsys, tmp_path):
    ckpt = tmp_path / "final.ckpt"
    ckpt.mkdir()
    _, trainer = split(dry_run(capsys, "deepfm", "--config", CONFIG, "--evaluate", str(ckpt)))
    assert trainer[-2:] == ["--evaluate", str(ckpt)]
    _, trainer = split(
        dry_run(capsys, "deepfm", "--config", CONFIG, "--init-from", str(ckpt), "--resume", "auto")
    )
    assert trainer[-4:] == ["--resume", "auto", "--init-from", str(ckpt)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "node-a"], "--rdzv-endpoint 'node-a': expected HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "node-a:0"], "a port in 1..65535"),
        (["--nnodes", "2", "--rdzv-endpoint", "node-a:70000"], "a port in 1..65535"),
        (["--nnodes", "2", "--rdzv-endpoint", "a:1", "--node-rank", "2"], "--node-rank 2 is outside 0..1"),
        (["--nnodes", "2", "--rdzv-endpoint", "a:1", "--rdzv-id", "my job"], "--rdzv-id 'my job'"),
        (["--node-rank", "1"], "--node-rank 1 is outside 0..0"),
        (["--nnodes", "0"], "--nnodes must be >= 1"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
        (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
        (["--rdzv-id", "x"], "--rdzv-id needs --rdzv-endpoint"),
        (["--set", "trainer.max_epochs"], "--set 'trainer.max_epochs': expected KEY=VALUE"),
        (["--set", "=2"], "expected KEY=VALUE"),
        (["--resume", "/no/such/ckpt"], "--resume /no/such/ckpt: no such checkpoint"),
        (["--evaluate", "/no/such/ckpt"], "--evaluate /no/such/ckpt: no such checkpoint"),
        (["--set", "trainer.nope=1"], "unknown key(s) ['nope']"),
    ],
)
def test_bad_arguments_fail_before_launch(capsys, args, message):
    code = funnel_main(["train", "deepfm", "--config", CONFIG, *args, "--dry-run"])
    captured = capsys.readouterr()
    assert code == 2
    assert not captured.out  # no command printed: nothing was launched
    assert "funnel train: error:" in captured.err and message in captured.err


def test_unknown_model_and_missing_config(capsys, tmp_path):
    assert funnel_main(["train", "bert4rec", "--config", CONFIG, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "MODEL 'bert4rec' is not a recipe; choose from" in err and "'deepfm'" in err
    assert funnel_main(["train", "deepfm", "--config", str(tmp_path / "absent.yaml"), "--dry-run"]) == 2
    assert "absent.yaml: no such file" in capsys.readouterr().err


def test_evaluate_excludes_resume(capsys, tmp_path):
    ckpt = tmp_path / "c.ckpt"
    ckpt.mkdir()
    assert (
        funnel_main(["train", "deepfm", "--config", CONFIG, "--evaluate", str(ckpt), "--resume", "auto"]) == 2
    )
    assert "--evaluate only tests a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args", [["deepfm"], ["--config", CONFIG], ["deepfm", "--config", CONFIG, "--nnodes", "two"]]
)
def test_argparse_rejects_missing_or_malformed_arguments(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        funnel_main(["train", *args])
    assert exit_info.value.code == 2
    assert "usage: funnel train" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_failure_streams_through_and_sets_the_exit_code(tmp_path):
    """A real launch whose trainer fails on its config: the output reaches the caller, the code too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "train", "deepfm", "--config", CONFIG, "--nproc-per-node", "1",
         "--set", f"data.path={tmp_path / 'absent'}", "--set", "data.prepare=null"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its worker too
        proc.communicate()
        raise
    assert out.startswith("funnel train: ")
    assert "is not a prepared dataset and data.prepare is not set" in err
    assert proc.returncode == 1  # torchrun's code for a failed worker group


def test_funnel_evaluate_is_train_with_evaluate(capsys, tmp_path):
    ckpt = tmp_path / "final.ckpt"
    ckpt.mkdir()
    argv = ["evaluate", "deepfm", str(ckpt), "--config", CONFIG, "--nproc-per-node", "2", "--dry-run"]
    assert funnel_main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("funnel evaluate: ")
    torchrun, trainer = split(shlex.split(line.removeprefix("funnel evaluate: ")))
    assert torchrun == ["--nproc-per-node=2", "--standalone", "--max-restarts=0"]
    assert trainer == ["-m", "trainer", "--model", "deepfm", "--config", CONFIG, "--evaluate", str(ckpt)]
    assert funnel_main(["evaluate", "deepfm", str(tmp_path / "absent"), "--config", CONFIG, "--dry-run"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
