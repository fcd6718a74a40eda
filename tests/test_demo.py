"""The README's main command: `funnel demo` runs the whole funnel end to end (tiny world here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_train_export_serve_query_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch",
            "demo",
            "--preset",
            "tiny",
            "--epochs",
            "1",
            "--run-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    for step in (
        "train deepfm",
        "train two_tower",
        "train sasrec",
        "export ranking",
        "assemble the bundle",
        "serve the bundle",
    ):
        assert step in out
    assert "POST /recommend" in out and "latency ms:" in out and "cold-start user -> ['" in out
    assert (tmp_path / "bundle" / "manifest.json").is_file()
