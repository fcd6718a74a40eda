"""``funnel demo``: the whole funnel end to end on the built-in synthetic world.

generate data -> train DeepFM, two-tower and SASRec on N ranks (torchrun) -> export the ranking
artifact and the retrieval indexes -> assemble a bundle -> serve it over HTTP -> query it.
Every step is a real ``funnel`` subcommand in its own process, so the demo runs exactly what a
user would type; each step is skipped when its output already exists (rerun-safe).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HEADLINE_METRICS = {
    "test/auc",
    "test/logloss",
    "test/recall@20",
    "test/ndcg@20",
    "test/pop_recall@20",
    "test/sampled_ndcg@10",
    "test/sampled_hr@10",
    "test/full_hr@10",
}


def register(subparsers: Any) -> None:  # argparse's _SubParsersAction is private
    p = subparsers.add_parser(
        "demo",
        help="run the whole funnel end to end on the synthetic world",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="where everything is written")
    p.add_argument("--preset", default="small", help="synthetic world preset (tiny, small, medium)")
    p.add_argument("--nproc-per-node", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--epochs", type=int, default=None, help="override every model's max_epochs")
    p.add_argument("--logger", default="csv", choices=("csv", "wandb", "none"))
    p.set_defaults(func=demo)


def _funnel(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch", *args]


def _step(title: str, command: list[str], done: Path | None = None) -> None:
    print(f"\n=== {title} ===", flush=True)
    if done is not None and done.exists():
        print(f"(exists: {done}; skipped)", flush=True)
        return
    print("$ " + " ".join(command[2:] if command[:2] == [sys.executable, "-m"] else command), flush=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    if code:
        raise SystemExit(f"funnel demo: step '{title}' failed with exit code {code}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


def _recipes() -> list[str]:
    from trainer.run import RECIPES

    return [name for name in ("deepfm", "two_tower", "sasrec") if name in RECIPES]


def demo(args: argparse.Namespace) -> int:
    run = args.run_dir.resolve()
    data = run / "data"
    _step(
        "1. synthetic world",
        _funnel("data", "prepare", "synthetic", "--preset", args.preset, "--out", str(data)),
        done=data / "meta.json",
    )
    common = ["--set", f"data.path={data}", "--set", f"logger.kind={args.logger}"]
    if args.epochs is not None:
        common += ["--set", f"trainer.max_epochs={args.epochs}"]
    recipes = _recipes()
    configs = {
        "deepfm": "configs/deepfm_synthetic.yaml",
        "two_tower": "configs/two_tower_synthetic.yaml",
        "sasrec": "configs/sasrec_synthetic.yaml",
    }
    for i, name in enumerate(recipes, start=2):
        out = run / name
        _step(
            f"{i}. train {name} on {args.nproc_per_node} rank(s)",
            _funnel(
                "train",
                name,
                "--config",
                configs[name],
                "--nproc-per-node",
                str(args.nproc_per_node),
                *common,
                "--set",
                f"run_dir={out}",
            ),
            done=out / "summary.json",
        )
    artifacts = run / "artifacts"
    ckpt = "checkpoints/final.ckpt"
    n = len(recipes) + 2
    _step(
        f"{n}. export ranking artifact (torch.export, fp32)",
        _funnel(
            "export",
            "ranking",
            "--checkpoint",
            str(run / "deepfm" / ckpt),
            "--config",
            configs["deepfm"],
            "--out",
            str(artifacts / "ranking"),
            "--set",
            f"data.path={data}",
        ),
        done=artifacts / "ranking" / "manifest.json",
    )
    retrieval: list[str] = []
    for name, command in (("two_tower", "retrieval"), ("sasrec", "sequential")):
        if name not in recipes:
            continue
        n += 1
        _step(
            f"{n}. export {name} retrieval index (FAISS)",
            _funnel(
                "export",
                command,
                "--checkpoint",
                str(run / name / ckpt),
                "--config",
                configs[name],
                "--out",
                str(artifacts / name),
                "--set",
                f"data.path={data}",
                "--index",
                "ivf_flat",
            ),
            done=artifacts / name / "manifest.json",
        )
        retrieval += ["--retrieval", f"{name}={artifacts / name}"]
    n += 1
    bundle = run / "bundle"
    _step(
        f"{n}. assemble the bundle",
        _funnel(
            "export",
            "bundle",
            "--ranking",
            f"deepfm={artifacts / 'ranking'}",
            *retrieval,
            "--dataset",
            str(data),
            "--out",
            str(bundle),
        ),
        done=bundle / "manifest.json",
    )
    n += 1
    print(f"\n=== {n}. serve the bundle and query it ===", flush=True)
    port = _free_port()
    server = subprocess.Popen(_funnel("serve", str(bundle), "--port", str(port)), cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                _http(f"{base}/readyz")
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("funnel demo: the server did not become ready") from None
                time.sleep(0.5)
        request = {"user_id": _first_user(data), "k": 10, "diversity": 0.3}
        response = _http(f"{base}/recommend", request)
        print(f"POST /recommend {json.dumps(request)}")
        print(f"{'item':<12}{'final':>8}{'ranking':>9}  sources")
        for item in response["items"]:
            stages = item["stages"]
            print(
                f"{item['item_id']!s:<12}{item['score']:>8.3f}{stages['ranking']:>9.3f}  "
                f"{', '.join(sorted(stages['retrieval']))}"
            )
        print(
            "latency ms:",
            {k: round(v, 2) for k, v in response["latency_ms"].items()},
            f"candidates: {response['candidates']}  sources: {response['sources']}",
        )
        cold = _http(
            f"{base}/recommend", {"user_id": "someone-new", "recent_items": _first_items(data, 3), "k": 5}
        )
        print("cold-start user ->", [item.get("item_id") for item in cold.get("items", [])])
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nfunnel demo: done. Run directory: {run}")
    for name in recipes:
        summary = json.loads((run / name / "summary.json").read_text())
        metrics = {k: round(v, 4) for k, v in summary["metrics"].items() if k in HEADLINE_METRICS}
        print(f"  {name:<10} {summary['samples_per_sec']:>10,.0f} samples/s  {metrics}")
    return 0


def _first_user(data: Path) -> str:
    import numpy as np

    return str(np.load(data / "idmaps" / "user.npy")[0])


def _first_items(data: Path, count: int) -> list[str]:
    import numpy as np

    return [str(x) for x in np.load(data / "idmaps" / "item.npy")[:count]]
