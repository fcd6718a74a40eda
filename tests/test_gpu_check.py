"""`launch/gpu_check.sh`: the dry run checks what a CPU machine can and skips the CUDA checks; the
real mode on a machine without CUDA fails, naming the checks, with a non-zero exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_check.sh"
SKIPPED = {"status": "skipped", "reason": "no CUDA"}


def gpu_check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without CUDA")
def test_dry_run_trains_every_model_on_cpu_and_skips_cuda(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = gpu_check("--dry-run", "--steps", "5", "--work-dir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is the JSON summary and nothing else
    assert report == json.loads(out.read_text())
    assert report["mode"] == "dry-run" and report["ok"] and report["failed"] == []
    checks = report["checks"]

    env = checks["environment"]
    assert env["status"] == "ok" and env["torch"].startswith("2.") and env["fbgemm_gpu"]["build"] == "cpu"
    assert env["cuda_devices"] == []

    assert checks["fbgemm"]["cuda"] == SKIPPED
    assert checks["fbgemm"]["cpu"]["status"] == "ok" and checks["fbgemm"]["cpu"]["fwd_bwd_ms"] > 0

    from trainer.run import RECIPES

    assert set(checks["train"]) == set(RECIPES)
    assert "deepfm" in RECIPES
    for model, entry in checks["train"].items():
        assert entry["cuda"] == SKIPPED
        has_config = (REPO / "configs" / f"{model}_synthetic.yaml").is_file()
        assert entry["cpu"]["status"] == ("ok" if has_config else "skipped"), (model, entry)
        if has_config:
            cpu = entry["cpu"]
            assert cpu["steps"] == 5 and cpu["samples_per_sec"] > 0 and cpu["precision"] == "32-true"
            assert cpu["loss_is_finite"]

    assert checks["process_group"]["nccl"] == SKIPPED
    gloo = checks["process_group"]["gloo"]
    assert (
        gloo["status"] == "ok" and gloo["world_size"] == 2 and gloo["all_reduce_ok"] and gloo["all_to_all_ok"]
    )

    faiss = checks["faiss"]
    assert faiss["status"] == "ok" and faiss["gpu"] == SKIPPED
    assert faiss["cpu"]["flat"]["qps"] > 0 and faiss["cpu"]["ivf"]["recall_vs_exact"] > 0.5


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_real_mode_without_cuda_fails_and_names_the_cuda_checks(tmp_path: Path) -> None:
    proc = gpu_check(
        "--models", "deepfm", "--faiss-vectors", "2000", "--faiss-queries", "50", "--work-dir", str(tmp_path)
    )
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["mode"] == "gpu" and not report["ok"]
    assert {"fbgemm.cuda", "train.deepfm.cuda", "process_group.nccl", "faiss.gpu"} <= set(report["failed"])
    assert report["checks"]["fbgemm"]["cpu"]["status"] == "ok"  # what can run still runs
    assert "no CUDA" in report["checks"]["train"]["deepfm"]["cuda"]["error"]


def test_bad_arguments(tmp_path: Path) -> None:
    proc = gpu_check("--steps", "0")
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr
