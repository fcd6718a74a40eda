"""GPU machine check: can this box train funnel models, and how fast? One JSON summary on stdout.

Checks, in order (each ``ok``, ``failed`` or ``skipped`` with a reason):

* ``environment``: versions (torch, CUDA, NCCL, TorchRec, FBGEMM and its build, FAISS, Lightning)
  and devices, from ``funnel doctor``'s collector;
* ``fbgemm``: FBGEMM's table-batched embedding kernel (the one TorchRec trains with) runs a forward
  and backward on ``cuda`` (the CUDA build loads) and on ``cpu``;
* ``train``: every recipe in ``trainer.run.RECIPES`` that has a ``configs/<model>_synthetic.yaml``
  trains ``--steps`` steps through the real launcher (``funnel train`` -> torchrun -> trainer) on
  the tiny synthetic world: on ``cuda`` with bf16 autocast for the dense part, reporting samples/s;
* ``process_group``: a process group per backend over the local devices (``nccl``: one rank per GPU;
  ``gloo``: 2 CPU ranks) runs all-reduce and all-to-all (TorchRec's collective), checks the sums and
  measures all-reduce bandwidth;
* ``faiss``: exact (Flat) and IVF inner-product indexes built and searched on ``gpu`` and ``cpu``:
  build seconds, queries/s, IVF recall against exact search, and the GPU/CPU speed-up.

``--dry-run`` is for machines without CUDA: every CUDA check is ``skipped: no CUDA`` and the CPU
ones run (the model training on ``cpu`` in fp32). The exit code is 1 when any check failed.
``launch/gpu_check.sh`` runs this module with the right interpreter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA"
Result = dict[str, Any]

# Applied to every model's config: a short, checkpoint-free, validation-free run on a tiny world.
TRAIN_OVERRIDES = [
    "trainer.max_epochs=100000",
    "trainer.limit_val_batches=0",
    "trainer.test_after_fit=false",
    "trainer.checkpoint_every_n_steps=null",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=10",
    "logger.kind=none",
]


def skipped(reason: str) -> Result:
    return {"status": "skipped", "reason": reason}


def failed(error: str, **extra: Any) -> Result:
    return {"status": "failed", "error": error, **extra}


def guarded(check: Callable[[], Result]) -> Result:
    """Run one check; an exception is that check's failure, never the end of the report."""
    started = time.perf_counter()
    try:
        result = check()
    except Exception as e:  # the report must name every failure, whatever raised it
        result = failed(f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3))
    result.setdefault("status", "ok")
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def progress(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def run_logged(command: list[str], log: Path, env: dict[str, str], timeout: float) -> int:
    """Run ``command`` with its output in ``log``; on timeout kill it with everything it started.

    torchrun's workers would outlive a killed torchrun, so the command gets its own process group.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\ngpu_check: killed after {timeout:g} s\n")
            return -signal.SIGKILL


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def check_environment() -> Result:
    from launch.doctor import assess, collect

    report = assess(collect())
    fbgemm, faiss, cuda = report["fbgemm_gpu"], report["faiss"], report["cuda"]
    return {
        # doctor's problems (a broken import, a missing package) fail it; its warnings do not
        "status": "ok" if report["ok"] else "failed",
        "problems": report["problems"],
        "warnings": report["warnings"],
        "python": report["python"],
        "torch": report["torch"].get("version"),
        "torch_cuda": report["torch"].get("cuda"),
        "nccl": report["distributed"].get("nccl_version"),
        "torchrec": report["torchrec"].get("version"),
        "fbgemm_gpu": {
            "version": fbgemm.get("version"),
            "build": fbgemm.get("variant") or fbgemm.get("build"),
        },
        "faiss": {"version": faiss.get("version"), "gpu_support": faiss.get("gpu_support")},
        "pytorch_lightning": report["packages"].get("pytorch_lightning"),
        "cuda_devices": cuda.get("devices", []),
        "doctor": report["verdict"],
    }


# --------------------------------------------------------------------------------------------------
# FBGEMM
# --------------------------------------------------------------------------------------------------


def check_fbgemm(device: str) -> Result:
    """Forward + backward (fused row-wise Adagrad) of FBGEMM's table-batched embedding bags."""
    import fbgemm_gpu
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    variant = getattr(fbgemm_gpu, "__variant__", None)
    if device == "cuda" and variant not in (None, "cuda"):
        return failed(f"the FBGEMM {variant} build is installed: GPU training needs fbgemm-gpu (CUDA)")
    rows, dim, batch = 100_000, 128, 4096
    location, compute = (
        (EmbeddingLocation.DEVICE, ComputeDevice.CUDA)
        if device == "cuda"
        else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    )
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(rows, dim, location, compute), (rows, dim, location, compute)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
        device=torch.device(device),
    )
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, rows, (2 * batch,), generator=generator).to(device)
    offsets = torch.arange(0, 2 * batch + 1, dtype=torch.int64).to(device)  # one id per bag
    before = tbe.split_embedding_weights()[0].detach().clone()

    def step() -> torch.Tensor:
        out = tbe(indices, offsets)
        out.sum().backward()  # the optimizer update is fused into this backward
        return out

    out = step()
    if tuple(out.shape) != (batch, 2 * dim):
        return failed(f"TBE output shape {tuple(out.shape)}, expected {(batch, 2 * dim)}")
    if torch.equal(before, tbe.split_embedding_weights()[0]):
        return failed("the fused backward did not update the table")
    decayed = weight_decay_applied(device)
    if device == "cuda" and not decayed:
        return failed("row-wise Adagrad ignored weight_decay_mode on CUDA (sparse_optimizer.weight_decay)")
    repeats = 20
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "device": device,
        "build": variant,
        "fwd_bwd_ms": round((time.perf_counter() - started) / repeats * 1000, 3),
        "batch": batch,
        "tables": f"2 x {rows} x {dim}",
        "weight_decay_applied": decayed,
    }


def weight_decay_applied(device: str) -> bool:
    """Whether fused row-wise Adagrad applies decoupled weight decay (0.5) to a row of 2.0s."""
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    location, compute = (
        (EmbeddingLocation.DEVICE, ComputeDevice.CUDA)
        if device == "cuda"
        else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    )
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(4, 8, location, compute)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
        weight_decay=0.5,
        weight_decay_mode=WeightDecayMode.DECOUPLE,
        device=torch.device(device),
    )
    tbe.split_embedding_weights()[0].data.fill_(2.0)
    tbe(torch.tensor([1], device=device), torch.tensor([0, 1], device=device)).sum().backward()
    # Adagrad's first step moves the row by lr whatever the gradient; the decay adds lr * wd * w
    return abs(float(tbe.split_embedding_weights()[0][1, 0]) - (2.0 - 0.1 - 0.1 * 0.5 * 2.0)) < 1e-4


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def recipes() -> list[str]:
    from trainer.run import RECIPES

    return sorted(RECIPES)


def default_configs() -> Path:
    """``./configs`` (the Docker image's /workspace/configs), else the repository's."""
    here = Path.cwd() / "configs"
    return here if here.is_dir() else REPO / "configs"


def check_train(model: str, device: str, steps: int, work: Path, timeout: float, configs: Path) -> Result:
    """``funnel train MODEL`` for ``steps`` steps on one process; samples/s from its summary.json."""
    import yaml

    from launch.train_cmd import build_command

    config = configs / f"{model}_synthetic.yaml"
    if not config.is_file():
        return skipped(f"recipe {model!r} has no config {config}")
    prepare = (yaml.safe_load(config.read_text()).get("data") or {}).get("prepare") or {}
    if prepare.get("kind") != "synthetic":
        return skipped(f"{config.name} does not train on the synthetic world")
    run_dir = work / f"train-{model}-{device}"
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    overrides = TRAIN_OVERRIDES + [
        f"trainer.max_steps={steps}",
        f"trainer.precision={precision}",
        f"sharding.compute_device={device}",
        f"data.path={work / 'synthetic-tiny'}",
        "data.prepare={kind: synthetic, preset: tiny, seed: 0}",
        f"run_dir={run_dir}",
    ]
    args = argparse.Namespace(
        model=model,
        config=str(config),
        nproc_per_node=1,
        nnodes=1,
        node_rank=None,
        rdzv_endpoint=None,
        rdzv_id=None,
        max_restarts=0,
        resume=None,
        init_from=None,
        evaluate=None,
        overrides=overrides,
    )
    command = build_command(args)
    log = work / f"train-{model}-{device}.log"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    code = run_logged(command, log, env, timeout)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        return failed(f"funnel train exited {code}", log=str(log), log_tail=tail)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["global_step"] != steps:
        return failed(f"trained {summary['global_step']} steps, expected {steps}", log=str(log))
    loss = summary["metrics"].get("train/loss")
    return {
        "device": device,
        "precision": precision,
        "pipelined": summary.get("pipelined"),
        "steps": summary["global_step"],
        "samples_per_sec": summary["samples_per_sec"],
        "fit_seconds": summary["fit_seconds"],
        "train_loss": round(loss, 4) if loss is not None else None,
        "loss_is_finite": loss is not None and math.isfinite(loss),
        "status": "ok" if loss is None or math.isfinite(loss) else "failed",
    }


# --------------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------------


def collective_worker(backend: str, result_path: Path, megabytes: int) -> None:
    """Runs in every rank under torchrun: all-reduce and all-to-all, checked, and all-reduce timed."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    sum_ok = bool(torch.all(x == world * (world + 1) / 2).item())
    send = torch.arange(world * 4, dtype=torch.float32, device=device) + 1000 * rank
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send)
    expected = torch.cat(
        [torch.arange(rank * 4, rank * 4 + 4, dtype=torch.float32) + 1000 * r for r in range(world)]
    )
    all_to_all_ok = bool(torch.equal(received.cpu(), expected))
    payload = torch.ones(megabytes * 2**20 // 4, device=device)
    dist.all_reduce(payload)  # warm-up: NCCL sets up its channels on the first large call
    repeats = 5
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(payload)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    # NCCL's "bus bandwidth": what each link carries in a ring all-reduce.
    bus = payload.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else None
    if rank == 0:
        result_path.write_text(
            json.dumps(
                {
                    "world_size": world,
                    "all_reduce_ok": sum_ok,
                    "all_to_all_ok": all_to_all_ok,
                    "all_reduce_mib": megabytes,
                    "all_reduce_ms": round(seconds * 1000, 3),
                    "bus_bandwidth_gbps": round(bus, 2) if bus is not None else None,
                }
            )
        )
    dist.destroy_process_group()


def check_process_group(backend: str, nproc: int, work: Path, timeout: float) -> Result:
    result_path = work / f"process_group_{backend}.json"
    log = work / f"process_group_{backend}.log"
    megabytes = 256 if backend == "nccl" else 16
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "launch.gpu_check", "--collective-worker", backend, "--result", str(result_path),
        "--megabytes", str(megabytes),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = run_logged(command, log, env, timeout)
    if code != 0 or not result_path.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        return failed(f"torchrun exited {code}", log=str(log), log_tail=tail)
    result = json.loads(result_path.read_text())
    result["backend"] = backend
    if not (result["all_reduce_ok"] and result["all_to_all_ok"]):
        result["status"] = "failed"
        result["error"] = "a collective returned wrong values"
    return result


# --------------------------------------------------------------------------------------------------
# FAISS
# --------------------------------------------------------------------------------------------------


def _faiss_data(n: int, queries: int, dim: int) -> tuple[Any, Any]:
    import numpy as np

    # Clustered, like item embeddings: on uniform noise IVF recall would say nothing.
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, dim)).astype(np.float32)
    base = centers[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    query = centers[rng.integers(0, 256, queries)] + 0.5 * rng.standard_normal((queries, dim)).astype(
        np.float32
    )
    return base, query


def _measure_index(
    index: Any, base: Any, query: Any, k: int, train_rows: int, nprobe: int | None, params: Any
) -> tuple[dict[str, Any], Any]:
    started = time.perf_counter()
    if not index.is_trained:
        index.train(base[:train_rows])
    index.add(base)
    build = time.perf_counter() - started
    if nprobe is not None:
        params.set_index_parameter(index, "nprobe", nprobe)
    index.search(query[:16], k)  # warm-up (GPU kernels, thread pools)
    started = time.perf_counter()
    _, ids = index.search(query, k)
    search = time.perf_counter() - started
    return {
        "build_s": round(build, 3),
        "search_s": round(search, 3),
        "qps": round(len(query) / search, 1),
    }, ids


def _recall(found: Any, truth: Any) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True))
    return round(hits / truth.size, 4)


def check_faiss(gpu: Result | None, n: int, queries: int, dim: int = 128, k: int = 100) -> Result:
    """CPU figures always; GPU ones unless ``gpu`` is the skip/failure to report in their place."""
    import faiss

    base, query = _faiss_data(n, queries, dim)
    nlist = max(16, min(1024, int(4 * math.sqrt(n)), n // 64))  # >= 64 training points per list
    train_rows = min(n, 64 * nlist)
    nprobe = 16
    result: Result = {
        "vectors": n,
        "queries": queries,
        "dim": dim,
        "k": k,
        "ivf_nlist": nlist,
        "nprobe": nprobe,
    }

    cpu: Result = {"threads": faiss.omp_get_max_threads()}
    params = faiss.ParameterSpace()
    cpu["flat"], exact = _measure_index(faiss.IndexFlatIP(dim), base, query, k, train_rows, None, params)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    cpu["ivf"], ids = _measure_index(ivf, base, query, k, train_rows, nprobe, params)
    cpu["ivf"]["recall_vs_exact"] = _recall(ids, exact)
    result["cpu"] = cpu
    if gpu is not None:
        result["gpu"] = gpu
        return result
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        result["gpu"] = failed("FAISS is the CPU build or sees no GPU: install the gpu extra (faiss-gpu)")
        result["status"] = "failed"
        result["error"] = result["gpu"]["error"]
        return result
    resources = faiss.StandardGpuResources()
    params = faiss.GpuParameterSpace()
    g: Result = {"devices": faiss.get_num_gpus()}
    g["flat"], gpu_exact = _measure_index(
        faiss.GpuIndexFlatIP(resources, dim), base, query, k, train_rows, None, params
    )
    g["flat"]["recall_vs_cpu_exact"] = _recall(gpu_exact, exact)
    gpu_ivf = faiss.GpuIndexIVFFlat(resources, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    g["ivf"], ids = _measure_index(gpu_ivf, base, query, k, train_rows, nprobe, params)
    g["ivf"]["recall_vs_exact"] = _recall(ids, exact)
    result["gpu"] = g
    result["speedup"] = {
        "flat_search": round(g["flat"]["qps"] / cpu["flat"]["qps"], 1),
        "ivf_build": round(cpu["ivf"]["build_s"] / max(g["ivf"]["build_s"], 1e-9), 1),
        "ivf_search": round(g["ivf"]["qps"] / cpu["ivf"]["qps"], 1),
    }
    if g["flat"]["recall_vs_cpu_exact"] < 0.99:
        result["status"] = "failed"
        result["error"] = "GPU exact search disagrees with CPU exact search"
    return result


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace) -> Result:
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    gpus = torch.cuda.device_count() if cuda else 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="funnel-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    steps, timeout = args.steps, args.timeout
    configs = Path(args.configs) if args.configs else default_configs()
    n = args.faiss_vectors or (20_000 if dry else 1_000_000)
    queries = args.faiss_queries or (1_000 if dry else 10_000)
    started = time.perf_counter()

    def on_cuda(check: Callable[[], Result]) -> Result:
        if not cuda:
            return skipped(NO_CUDA) if dry else failed(f"{NO_CUDA}: torch sees no device (use --dry-run)")
        return guarded(check)

    report: Result = {"mode": "dry-run" if dry else "gpu", "work_dir": str(work), "checks": {}}
    checks = report["checks"]
    progress("environment")
    checks["environment"] = guarded(check_environment)
    progress("fbgemm kernels")
    checks["fbgemm"] = {
        "cuda": on_cuda(lambda: check_fbgemm("cuda")),
        "cpu": guarded(lambda: check_fbgemm("cpu")),
    }
    models = args.models or recipes()
    checks["train"] = {}
    for model in models:
        progress(f"training {model} for {steps} steps")
        entry: Result = {
            "cuda": on_cuda(lambda m=model: check_train(m, "cuda", steps, work, timeout, configs))
        }
        if dry:
            entry["cpu"] = guarded(lambda m=model: check_train(m, "cpu", steps, work, timeout, configs))
        checks["train"][model] = entry
    progress("process groups")
    checks["process_group"] = {
        "nccl": on_cuda(lambda: check_process_group("nccl", gpus, work, timeout)),
        "gloo": guarded(lambda: check_process_group("gloo", 2, work, timeout)),
    }
    progress(f"faiss ({n:,} x 128 vectors, {queries:,} queries)")
    gpu_state = None if cuda else on_cuda(lambda: {})  # the skip (or failure) to report for the GPU
    checks["faiss"] = guarded(lambda: check_faiss(gpu_state, n, queries))
    report["failed"] = sorted(_failures(checks))
    report["ok"] = not report["failed"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _failures(node: Any, path: str = "") -> list[str]:
    """Dotted paths of every result with status "failed", nested ones included."""
    if not isinstance(node, dict):
        return []
    found = [path] if node.get("status") == "failed" else []
    for key, value in node.items():
        found += _failures(value, f"{path}.{key}" if path else key)
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dry-run", action="store_true", help="no CUDA here: run the CPU checks, skip the GPU ones"
    )
    p.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    p.add_argument(
        "--models", nargs="*", help="recipes to train (default: every one with a synthetic config)"
    )
    p.add_argument("--faiss-vectors", type=int, help="index size (default 1M; 20K with --dry-run)")
    p.add_argument("--faiss-queries", type=int, help="queries (default 10K; 1K with --dry-run)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per subprocess (default 240)")
    p.add_argument("--work-dir", help="where datasets, runs and logs go (default: a new temporary dir)")
    p.add_argument("--out", help="also write the JSON summary here")
    p.add_argument(
        "--configs", help="directory of <model>_synthetic.yaml (default: ./configs, else the repo's)"
    )
    # internal: one rank of the process-group check, started by torchrun
    p.add_argument("--collective-worker", choices=["nccl", "gloo"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--megabytes", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.collective_worker:
        collective_worker(args.collective_worker, Path(args.result), args.megabytes)
        return 0
    report = run_checks(args)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
