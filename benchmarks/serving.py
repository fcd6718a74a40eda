"""Serving latency and throughput: a 25,000-item bundle behind `funnel serve`, loaded by a separate process.

    python benchmarks/serving.py [--work-dir runs/bench-serving] [--duration 15] [--concurrency 1 16 64]
        [--label after] [--append] [--server-arg=--max-batch=32 ...] [--server-repo DIR]

Builds (once; reused when present) a synthetic world with a 25K-item catalog, trains DeepFM and the
two-tower model briefly on 2 ranks, exports the ranking and retrieval artifacts and the bundle,
starts ``funnel serve`` on a loopback port, then runs the load generator (this script with
``--loadgen``, a separate process) at each concurrency: that many closed-loop clients, each with
one keep-alive connection, sending ``POST /recommend`` for a mix of known users (80%) and
cold-start users with recent items (20%), k=10, diversity 0.2. Reports end-to-end latency
(client-side p50/p95/p99), requests/s, and the server's per-stage latencies (from each response's
``latency_ms``: queue, retrieval, ranking, rerank, total, and the batch each request ran in), and
the CPU time the server and the load generator spent per request (from ``/proc`` and ``getrusage``:
unlike latency, it barely moves when other jobs compete for the cores). Prints a table and writes
``benchmarks/results/serving.json``; with ``--append`` the run is added to the file's ``runs``.

Both processes share this machine's cores: the load generator is a minimal asyncio HTTP/1.1 client
so that it takes as little CPU from the server as possible. ``--server-repo`` serves from another
checkout (e.g. ``git archive`` of an older commit) with the same load generator: before/after runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "serving.json"
STAGES = ("queue", "retrieval", "ranking", "rerank", "total")

WORLD = dict(
    name="synthetic-25k", num_users=20_000, num_items=25_000, num_interactions=600_000, ctr_rows=400_000,
    num_categories=32, num_tags=200, truth_pool=5_000,
)  # fmt: skip
DEEPFM = {
    "model_name": "deepfm",
    "model": {"embedding_dim": 16, "dense_arch": [64], "deep_arch": [256, 128, 64]},
    "data": {"batch_size": 2048, "eval_batch_size": 16384},
    "optimizer": {"name": "adam", "lr": 0.002},
    "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
    "trainer": {"max_epochs": 1, "log_every_n_steps": 50, "enable_progress_bar": False},
    "logger": {"kind": "csv"},
}
TWO_TOWER = {
    "model_name": "two_tower",
    "model": {"user_features": ["user", "age_bucket", "gender", "occupation", "region"],
              "item_features": ["item", "category", "price_bucket", "tags"], "history_length": 20,
              "embedding_dim": 32, "user_arch": [128], "item_arch": [128], "output_dim": 64},
    "data": {"batch_size": 1024, "eval_batch_size": 2048},
    "optimizer": {"name": "adam", "lr": 0.002},
    "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
    "trainer": {"max_epochs": 1, "limit_train_batches": 300, "log_every_n_steps": 50,
                "enable_progress_bar": False, "test_after_fit": False},
    "logger": {"kind": "csv"},
}  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def build_bundle(work: Path, index: list[str]) -> tuple[Path, dict[str, Any]]:
    """World -> DeepFM + two-tower (2 ranks) -> artifacts -> bundle; each step skipped when done.

    ``index``: the `funnel export retrieval` index arguments (e.g. ``--index ivf_flat --nprobe 32``);
    each choice gets its own retrieval artifact and bundle next to the shared models.
    """
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    world = work / "world"
    timings: dict[str, float] = {}
    if not (world / "meta.json").is_file():
        from data.synthetic import SyntheticConfig, generate

        t = time.perf_counter()
        generate(SyntheticConfig(**WORLD), world)  # type: ignore[arg-type]
        timings["generate_s"] = time.perf_counter() - t
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "trainer",
    ]
    for name, recipe in (("deepfm", DEEPFM), ("two_tower", TWO_TOWER)):
        cfg = work / f"{name}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    **recipe,
                    "data": {**recipe["data"], "path": str(world)},  # type: ignore[dict-item]
                    "run_dir": str(work / name),
                }
            )
        )
        if not (work / name / "checkpoints" / "final.ckpt").exists():
            t = time.perf_counter()
            _run([*torchrun, "--config", str(cfg)])
            timings[f"train_{name}_s"] = time.perf_counter() - t
    funnel = [sys.executable, "-m", "launch", "export"]
    if not (work / "ranking" / "manifest.json").is_file():
        _run(
            [
                *funnel,
                "ranking",
                "--checkpoint",
                str(work / "deepfm/checkpoints/final.ckpt"),
                "--config",
                str(work / "deepfm.yaml"),
                "--out",
                str(work / "ranking"),
            ]
        )
    suffix = "-".join(a.lstrip("-") for a in index)
    retrieval = work / f"two_tower_index-{suffix}"
    if not (retrieval / "manifest.json").is_file():
        _run(
            [
                *funnel,
                "retrieval",
                "--checkpoint",
                str(work / "two_tower/checkpoints/final.ckpt"),
                "--config",
                str(work / "two_tower.yaml"),
                "--out",
                str(retrieval),
                *index,
            ]
        )
    bundle = work / f"bundle-{suffix}"
    if not (bundle / "manifest.json").is_file():
        _run(
            [
                *funnel,
                "bundle",
                "--ranking",
                str(work / "ranking"),
                "--retrieval",
                f"two_tower={retrieval}",
                "--dataset",
                str(world),
                "--out",
                str(bundle),
            ]
        )
    manifest = json.loads((bundle / "manifest.json").read_text())
    info = {
        "items": manifest["extra"]["items"],
        "users": manifest["extra"]["users"],
        "build": timings,
        "ranking_test_auc": manifest["metrics"]["ranking"]["deepfm"].get("test", {}).get("auc"),
        "retrieval_index": json.loads((retrieval / "meta.json").read_text())["index"],
        # the export's own measurement: ANN recall against exact search over the same embeddings
        "retrieval_ann": json.loads((retrieval / "manifest.json").read_text())["metrics"]["ann"],
    }
    return bundle, info


# -- load generator (runs in its own process) -----------------------------------------------------------
async def _client(
    host: str,
    port: int,
    bodies: list[bytes],
    deadline: float,
    out: list[tuple[float, dict]],
    errors: list[str],
    seed: int,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    rng = random.Random(seed)
    try:
        while time.perf_counter() < deadline:
            body = bodies[rng.randrange(len(bodies))]
            head = (
                f"POST /recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            payload = await reader.readexactly(length)
            elapsed = time.perf_counter() - started
            status = int(status_line.split()[1])
            if status != 200:
                errors.append(f"{status}: {payload[:200]!r}")
                continue
            answer = json.loads(payload)
            out.append((elapsed, {**answer["latency_ms"], "batch": answer.get("batch", 1)}))
    finally:
        writer.close()


async def _load(
    url: str, bodies: list[bytes], concurrency: int, duration: float, warmup: float
) -> tuple[list[tuple[float, dict]], list[str], float, float]:
    """(latencies, errors, wall seconds, this process's CPU seconds) of the measured window."""
    host, port = url.split("//")[1].split(":")
    await _drive(host, int(port), bodies, concurrency, warmup)  # connections, caches and pools warm up
    out: list[tuple[float, dict]] = []
    errors: list[str] = []
    cpu = _own_cpu()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *[_client(host, int(port), bodies, deadline, out, errors, seed=i) for i in range(concurrency)]
    )
    return out, errors, time.perf_counter() - started, _own_cpu() - cpu


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` and its children so far; None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def _drive(host: str, port: int, bodies: list[bytes], concurrency: int, duration: float) -> None:
    sink: list[tuple[float, dict]] = []
    await asyncio.gather(
        *[
            _client(host, port, bodies, time.perf_counter() + duration, sink, [], seed=1000 + i)
            for i in range(concurrency)
        ]
    )


def _pcts(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def loadgen(args: argparse.Namespace) -> None:
    bodies = [line.encode() for line in Path(args.bodies).read_text().splitlines() if line]
    concurrency = args.concurrency[0]
    out, errors, wall, cpu = asyncio.run(_load(args.url, bodies, concurrency, args.duration, args.warmup))
    stages = [s for s in STAGES if out and all(s in lat for _, lat in out)]  # older servers: no queue
    result = {
        "concurrency": concurrency,
        "requests": len(out),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": wall,
        "requests_per_s": len(out) / wall,
        "end_to_end_ms": _pcts([1000 * e for e, _ in out]) if out else {},
        "server_stage_ms": {s: _pcts([lat[s] for _, lat in out]) for s in stages},
        "batch_size": _pcts([lat["batch"] for _, lat in out]) if out else {},
        "loadgen_cpu_ms_per_request": 1000 * cpu / max(len(out), 1),
    }
    Path(args.out).write_text(json.dumps(result))


# -- driver ---------------------------------------------------------------------------------------------
def _bodies(bundle: Path, n: int = 2000, seed: int = 0) -> list[str]:
    users = np.load(bundle / "users" / "ids.npy").tolist()
    items = np.load(bundle / "items" / "ids.npy").tolist()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.8:
            body: dict[str, Any] = {"user_id": rng.choice(users), "k": 10, "diversity": 0.2}
        else:
            body = {
                "user_id": f"new-{rng.randrange(10**9)}",
                "recent_items": rng.sample(items, 5),
                "k": 10,
                "diversity": 0.2,
            }
        out.append(json.dumps(body))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds of ``pid`` and every live descendant (uvicorn workers); None without /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [c for c, p in parents.items() if p == parent]
        tree += children
        frontier += children
    values = [v for v in map(_process_cpu, tree) if v is not None]
    return sum(values) if values else None


def _wait_ready(server: subprocess.Popen[str], url: str) -> None:
    import httpx

    deadline = time.time() + 180
    while True:
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit(f"server did not start:\n{server.stdout.read() if server.stdout else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)


def _level(args: argparse.Namespace, url: str, bodies_path: Path, c: int, server_pid: int) -> dict[str, Any]:
    """One concurrency level: the load generator's result plus the server's CPU time per request."""
    out = args.work_dir / f"loadgen-{c}.json"
    load_before = os.getloadavg()[0]
    cpu_before = _tree_cpu(server_pid)
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--loadgen",
            "--url",
            url,
            "--bodies",
            str(bodies_path),
            "--concurrency",
            str(c),
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
            "--out",
            str(out),
        ],
        check=True,
        env=_env(),
    )
    cpu_after = _tree_cpu(server_pid)
    r: dict[str, Any] = json.loads(out.read_text())
    r["load_average_1m_before"] = round(load_before, 2)
    if cpu_before is not None and cpu_after is not None:
        # the warm-up's requests are not counted in r["requests"]: scale them in by time
        served = r["requests"] * (args.duration + args.warmup) / args.duration
        r["server_cpu_ms_per_request"] = 1000 * (cpu_after - cpu_before) / max(served, 1)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-serving")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured per concurrency level")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before each level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `funnel serve` argument, repeatable (e.g. --server-arg=--max-batch=16)",
    )
    p.add_argument(
        "--server-repo",
        type=Path,
        default=REPO,
        help="checkout whose `funnel serve` runs (default this one; e.g. a `git archive` of an older commit)",
    )
    p.add_argument(
        "--retrieval-index",
        default="--index ivf_flat --nprobe 32",
        help="`funnel export retrieval` index arguments of the bundle's two-tower index "
        "(default IVF-Flat, 32 of 256 lists: recall@100 0.98 against exact search, a quarter of its CPU)",
    )
    p.add_argument("--label", default="", help="name of this run in the results file")
    p.add_argument("--append", action="store_true", help="add this run to the results file's runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--bodies", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loadgen:
        loadgen(args)
        return 0

    bundle, info = build_bundle(args.work_dir, args.retrieval_index.split())
    bodies_path = args.work_dir / "bodies.jsonl"
    bodies_path.write_text("\n".join(_bodies(bundle)))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "launch", "serve", str(bundle), "--port", str(port), *args.server_arg]
    server = subprocess.Popen(
        command, cwd=args.server_repo, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    levels: dict[str, Any] = {}
    load_before = os.getloadavg()
    try:
        _wait_ready(server, url)
        for c in args.concurrency:
            r = levels[str(c)] = _level(args, url, bodies_path, c, server.pid)
            e2e, st = r["end_to_end_ms"], r["server_stage_ms"]
            print(
                f"concurrency {c:>3} (load {r['load_average_1m_before']:.2f}): "
                f"{r['requests_per_s']:7.1f} req/s  end-to-end p50 {e2e['p50']:6.2f}  p95 {e2e['p95']:6.2f}  "
                f"p99 {e2e['p99']:6.2f} ms  | server p50 "
                + " ".join(f"{s} {v['p50']:.2f}" for s, v in st.items())
                + f" ms  batch mean {r['batch_size']['mean']:.1f}  server cpu/request "
                f"{r.get('server_cpu_ms_per_request', float('nan')):.2f} ms  errors {r['errors']}",
                flush=True,
            )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    run = {
        "label": args.label,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # other work on the machine competes for the same cores: part of reading the numbers
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "bundle": {"path": str(bundle), **info},
        "request_mix": "80% known users, 20% cold start with 5 recent items; k=10, diversity 0.2",
        "server": {
            "command": ["funnel", "serve", "BUNDLE", *args.server_arg],
            "repo": str(args.server_repo),
            "note": "one machine: the load generator and other jobs share the server's cores",
        },
        "duration_s": args.duration,
        "levels": levels,
    }
    runs: list[dict[str, Any]] = []
    if args.append and args.out.is_file():
        runs = json.loads(args.out.read_text()).get("runs", [])
    result = {
        "benchmark": "serving",
        "targets_ms": {"p99_budget": 150, "aim_p99_at_16_clients": 15},
        "runs": [*runs, run],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
