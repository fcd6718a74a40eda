"""`funnel doctor`: the real report on this machine, and the verdict logic on synthetic facts."""

from __future__ import annotations

import copy
import json

import pytest

from launch import doctor
from launch.cli import main

REPORT_KEYS = {
    "python",
    "platform",
    "torch",
    "cuda",
    "distributed",
    "fbgemm_gpu",
    "torchrec",
    "faiss",
    "packages",
    "env",
    "problems",
    "warnings",
    "mode",
    "ok",
    "verdict",
}


@pytest.fixture(scope="module")
def facts() -> dict:
    """One real collection for the module: importing torchrec and friends takes seconds."""
    return doctor.collect()


def test_doctor_text_verdict_ok(capsys):
    rc = main(["doctor"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert rc == 0, out
    assert lines[-1].startswith("verdict: OK ("), lines[-1]
    labels = ["torch ", "torch cuda", "torchrec ", "fbgemm_gpu ", "fbgemm build", "fbgemm ops", "faiss "]
    labels += ["faiss gpu support", "pytorch_lightning", "wandb", "numpy", "pyarrow", "cuda devices"]
    labels += ["nccl", "gloo"]
    for label in labels:
        assert any(line.startswith(label) for line in lines), f"no {label!r} line in:\n{out}"


def test_doctor_json(capsys):
    rc = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert REPORT_KEYS <= report.keys()
    assert report["ok"] is True and report["problems"] == []
    assert report["verdict"].startswith("OK (")
    assert report["torch"]["version"].startswith("2.14.")
    fbgemm_keys = {"version", "distributions", "build", "variant", "import_ok", "ops_ok"}
    assert fbgemm_keys <= report["fbgemm_gpu"].keys()
    assert report["fbgemm_gpu"]["import_ok"] and report["fbgemm_gpu"]["ops_ok"]
    assert {"version", "distributions", "gpu_support", "num_gpus"} <= report["faiss"].keys()
    assert {"available", "device_count", "devices"} <= report["cuda"].keys()
    assert {"nccl", "gloo"} <= report["distributed"].keys()
    assert set(report["packages"]) == {"pytorch_lightning", "wandb", "numpy", "pyarrow"}
    # The build that imports must match the kind of machine (the CPU wheel on driverless CI).
    if report["cuda"]["device_count"] == 0:
        assert report["verdict"].startswith("OK (CPU training: gloo")
        assert report["distributed"]["gloo"] is True


def _cuda_build_without_driver(facts: dict, also_cpu_dist: bool) -> dict:
    broken = copy.deepcopy(facts)
    broken["cuda"].update(available=False, device_count=0, devices=[], driver_library=None)
    dists = {"fbgemm-gpu": "1.9.0"}
    if also_cpu_dist:
        dists["fbgemm-gpu-cpu"] = "1.9.0"
    broken["fbgemm_gpu"].update(
        distributions=dists,
        build="cuda",
        variant="cuda",
        import_ok=False,
        ops_ok=False,
        error="OSError: Could not load this library: fbgemm_gpu_py.so (loader: libnvidia-ml.so.1: ...)",
    )
    broken["torchrec"].update(import_ok=False, error="not imported: fbgemm_gpu failed to import")
    return broken


def test_cuda_fbgemm_without_driver_is_a_problem_with_the_fix(facts):
    report = doctor.assess(_cuda_build_without_driver(facts, also_cpu_dist=False))
    assert report["ok"] is False
    assert report["verdict"].startswith("PROBLEM: ")
    assert "no NVIDIA driver" in report["verdict"]
    assert "pip uninstall fbgemm-gpu && pip install --no-deps fbgemm-gpu-cpu==1.9.0" in report["verdict"]
    # torchrec's failure is a consequence, not a second problem to chase.
    assert len(report["problems"]) == 1


def test_both_fbgemm_dists_fix_reinstalls_the_cpu_one(facts):
    report = doctor.assess(_cuda_build_without_driver(facts, also_cpu_dist=True))
    fix = "pip uninstall -y fbgemm-gpu fbgemm-gpu-cpu && pip install --no-deps fbgemm-gpu-cpu==1.9.0"
    assert fix in report["verdict"]
    assert any("several fbgemm distributions" in w for w in report["warnings"])


def test_problem_exit_code(monkeypatch, capsys, facts):
    monkeypatch.setattr(doctor, "collect", lambda: _cuda_build_without_driver(facts, also_cpu_dist=False))
    assert main(["doctor"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verdict: PROBLEM: ")


def test_missing_faiss_and_packages_are_problems(facts):
    broken = copy.deepcopy(facts)
    broken["faiss"].update(import_ok=False, error="ModuleNotFoundError: No module named 'faiss'")
    broken["packages"]["wandb"] = None
    report = doctor.assess(broken)
    assert not report["ok"]
    assert any("faiss" in p for p in report["problems"])
    assert any("wandb" in p for p in report["problems"])


def test_gpu_machine_verdict(facts):
    gpu = copy.deepcopy(facts)
    gpu["cuda"].update(
        available=True,
        device_count=2,
        driver_library="libcuda.so.1",
        devices=[
            {"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "capability": "9.0"}
            for i in range(2)
        ],
    )
    gpu["fbgemm_gpu"].update(variant="cuda", build="cuda", distributions={"fbgemm-gpu": "1.9.0"})
    gpu["distributed"].update(nccl=True)
    report = doctor.assess(gpu)
    assert report["ok"], report["problems"]
    assert report["verdict"] == "OK (GPU training: NCCL + FBGEMM CUDA kernels; 2 x NVIDIA H100 80GB HBM3)"
    # The same GPUs with the CPU build: still trains (on CPU), but says how to use the GPUs.
    gpu["fbgemm_gpu"].update(variant="cpu", build="cpu", distributions={"fbgemm-gpu-cpu": "1.9.0"})
    report = doctor.assess(gpu)
    assert report["ok"]
    assert report["mode"].startswith("CPU training")
    assert any("pip install fbgemm-gpu==1.9.0" in w for w in report["warnings"])
