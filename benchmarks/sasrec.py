"""SASRec on the paper's Amazon Video Games file: the paper's BCE setting, then the CE loss.

    python benchmarks/sasrec.py [--bce-minutes 12] [--ce-minutes 6] [--chunk-epochs 4]
                                [--out benchmarks/results/sasrec.json]

Trains ``configs/sasrec_video.yaml`` (d=50, 2 blocks, 1 head, max length 50, dropout 0.5, batch 128,
lr 1e-3, item table row-wise sharded) through the real entry point on 2 CPU ranks, twice: with the
paper's BCE loss (one sampled negative per position) and with full-softmax cross-entropy
(SASRec+). Training runs in chunks of ``--chunk-epochs`` epochs (``--resume auto``) until the
loss's time budget is spent or the validation reaches the paper's numbers; validation after each
epoch uses protocol 1 only (100 sampled negatives; cheap), and the final checkpoint is tested on
both protocols by ``--evaluate`` (2 ranks). Reported per loss: epochs, training wall time, samples/s,
the per-epoch validation curve, the epoch and wall time at which validation first reached the
paper's test numbers (if it did), and the test metrics of both protocols, next to the popularity
baseline and the paper (Table III: NDCG@10 0.5360, HR@10 0.7410 with 100 sampled negatives).

Wall times are of this machine as it is (other jobs may share the cores); nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.sequential import NegativeSampling, SequenceSplits  # noqa: E402
from data.shards import PreparedDataset  # noqa: E402

CONFIG = REPO / "configs" / "sasrec_video.yaml"
VIDEO = REPO.parent / "shared" / "data" / "sasrec_video" / "Video.txt"
PAPER = {"sampled_ndcg@10": 0.5360, "sampled_hr@10": 0.7410}  # Kang & McAuley 2018, Table III, "Games"
MAX_LEN = 50


def torchrun(args: list[str], log: Path) -> float:
    """Run ``python -m trainer`` on 2 CPU ranks; returns the wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "trainer", "--config", str(CONFIG), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"trainer failed ({proc.returncode}); see {log}")
    return time.perf_counter() - started


def sets(values: dict[str, Any]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def validation_curve(run_dir: Path) -> list[dict[str, float]]:
    """One row per epoch with its protocol-1 validation metrics, over every chunk's CSV log."""
    rows: dict[int, dict[str, float]] = {}
    logs = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    for path in logs:
        for r in csv.DictReader(path.open()):
            if r.get("val/sampled_ndcg@10"):
                rows[int(r["epoch"])] = {
                    "epoch": int(r["epoch"]) + 1,
                    "val/sampled_ndcg@10": float(r["val/sampled_ndcg@10"]),
                    "val/sampled_hr@10": float(r["val/sampled_hr@10"]),
                }
    return [rows[k] for k in sorted(rows)]


def reached(row: dict[str, float]) -> bool:
    return all(row[f"val/{k}"] >= v for k, v in PAPER.items())


def train_loss(loss: str, minutes: float, chunk: int, work: Path, dataset: Path) -> dict[str, Any]:
    run_dir = work / f"sasrec-video-{loss}"
    log = work / f"{loss}.log"
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists; remove it (or pass another --work-dir) for a fresh run")
    common = {"data.path": str(dataset), "run_dir": str(run_dir), "model.loss": loss,
              "model.validate_full_ranking": False, "trainer.test_after_fit": False,
              "trainer.enable_progress_bar": False}  # fmt: skip
    chunks: list[dict[str, Any]] = []
    epochs, train_wall, train_samples, train_seconds = 0, 0.0, 0.0, 0.0
    while train_wall < minutes * 60:
        epochs += chunk
        wall = torchrun([*sets({**common, "trainer.max_epochs": epochs}), "--resume", "auto"], log)
        summary = json.loads((run_dir / "summary.json").read_text())
        train_wall += wall
        samples = (summary["global_step"] - sum(c["steps"] for c in chunks)) * 128
        train_samples += samples
        train_seconds += summary["fit_seconds"]
        chunks.append({"epochs": epochs, "steps": summary["global_step"] - sum(c["steps"] for c in chunks),
                       "wall_s": round(wall, 1), "fit_s": summary["fit_seconds"],
                       "samples_per_sec": summary["samples_per_sec"]})  # fmt: skip
        curve = validation_curve(run_dir)
        last = curve[-1] if curve else {}
        print(f"[{loss}] {epochs} epochs, {train_wall / 60:.1f} min: {last}", flush=True)
        if any(reached(r) for r in curve):
            break
    curve = validation_curve(run_dir)
    # wall time at the end of an epoch, spread evenly within its chunk (restarts included)
    elapsed, at_epoch, done = 0.0, {}, 0
    for c in chunks:
        n = c["epochs"] - done
        for i in range(1, n + 1):
            at_epoch[done + i] = elapsed + c["wall_s"] * i / n
        elapsed += c["wall_s"]
        done = c["epochs"]
    first = next((r for r in curve if reached(r)), None)
    eval_dir = work / f"sasrec-video-{loss}-test"
    eval_wall = torchrun([*sets({**common, "run_dir": str(eval_dir)}), "--evaluate",
                          str(run_dir / "checkpoints" / "final.ckpt")], log)  # fmt: skip
    test = json.loads((eval_dir / "evaluation.json").read_text())["metrics"]
    return {
        "loss": loss,
        "epochs": epochs,
        "train_wall_s": round(train_wall, 1),
        "train_fit_s": round(train_seconds, 1),
        "samples_per_sec": round(train_samples / train_seconds, 1) if train_seconds else None,
        "test_eval_wall_s": round(eval_wall, 1),
        "reached_paper_on_val": first is not None,
        "epoch_reaching_paper": first["epoch"] if first else None,
        "wall_s_reaching_paper": round(at_epoch[first["epoch"]], 1) if first else None,
        "val_curve": [{**r, "wall_s": round(at_epoch.get(r["epoch"], float("nan")), 1)} for r in curve],
        "chunks": chunks,
        "test": {k.removeprefix("test/"): round(v, 4) for k, v in sorted(test.items())},
    }


def popularity(dataset: Path) -> dict[str, float]:
    """Both protocols for ranking by training popularity (the same candidates as the model's test)."""
    s = SequenceSplits(PreparedDataset(dataset), MAX_LEN, eval_negatives=100, negatives=NegativeSampling())
    rows = s.rows["test"]
    targets = s.values[s.offsets[rows + 1] - 1]
    counts = s.train_counts.astype(np.float64)
    rank = (counts[1:][None, :] > counts[targets][:, None]).sum(axis=1)
    negatives = s.eval_batch(rows, "test").negatives.numpy()
    sampled = (counts[negatives] >= counts[targets][:, None]).sum(axis=1)

    def ndcg(r: np.ndarray) -> float:
        return float(np.where(r < 10, 1 / np.log2(r + 2), 0).mean())

    return {
        "sampled_ndcg@10": round(ndcg(sampled), 4),
        "sampled_hr@10": round(float((sampled < 10).mean()), 4),
        "full_ndcg@10": round(ndcg(rank), 4),
        "full_hr@10": round(float((rank < 10).mean()), 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bce-minutes", type=float, default=12.0, help="training wall-time budget of the BCE run")
    p.add_argument("--ce-minutes", type=float, default=6.0, help="training wall-time budget of the CE run")
    p.add_argument("--chunk-epochs", type=int, default=4, help="epochs per torchrun (resumed between chunks)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-sasrec")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sasrec.json")
    args = p.parse_args()
    if not VIDEO.is_file():
        print(f"skipped: {VIDEO} not found", file=sys.stderr)
        return 0
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dataset = args.work_dir / "data" / "sasrec-video"
    if not (dataset / "meta.json").is_file():
        from data.prepare import prepare_sasrec

        prepare_sasrec(VIDEO, dataset)
    ds = PreparedDataset(dataset)
    results: dict[str, Any] = {
        "benchmark": "sasrec_video",
        "dataset": {"file": str(VIDEO), "users": ds.counts["users"], "items": ds.counts["items"],
                    "interactions": ds.counts["interactions"]},
        "settings": {"config": str(CONFIG.relative_to(REPO)), "ranks": 2, "device": "cpu",
                     "embedding_dim": 50, "num_blocks": 2, "num_heads": 1, "max_len": MAX_LEN, "dropout": 0.5,
                     "batch_size": 128, "dense_optimizer": "adam lr 1e-3",
                     "sparse_optimizer": "adagrad lr 0.05 (no fused Adam in FBGEMM on CPU; the paper: Adam)",
                     "budget_minutes": {"bce": args.bce_minutes, "ce": args.ce_minutes},
                     "validation": "protocol 1 (100 sampled negatives) every epoch; test: both protocols"},
        "paper": {"sampled_ndcg@10": PAPER["sampled_ndcg@10"], "sampled_hr@10": PAPER["sampled_hr@10"]},
        "popularity": popularity(dataset),
        "runs": {},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
    }  # fmt: skip
    for loss, minutes in (("bce", args.bce_minutes), ("ce", args.ce_minutes)):
        results["runs"][loss] = train_loss(loss, minutes, args.chunk_epochs, args.work_dir, dataset)
    results["total_wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {args.out}")
    return 0


def format_table(results: dict[str, Any]) -> str:
    cols = ["sampled_ndcg@10", "sampled_hr@10", "full_ndcg@10", "full_hr@10", "full_ndcg@20", "full_hr@20",
            "full_mrr"]  # fmt: skip
    header = "".join(f"{c:>16}" for c in cols)
    lines = [f"{'':<12}{header}{'epochs':>8}{'train min':>11}{'samples/s':>11}"]
    for name, values in (("paper", results["paper"]), ("popularity", results["popularity"])):
        lines.append(f"{name:<12}" + "".join(f"{values.get(c, float('nan')):>16.4f}" for c in cols))
    for loss, run in results["runs"].items():
        lines.append(
            f"{'SASRec ' + loss:<12}" + "".join(f"{run['test'].get(c, float('nan')):>16.4f}" for c in cols)
            + f"{run['epochs']:>8}{run['train_wall_s'] / 60:>11.1f}{run['samples_per_sec'] or 0:>11.0f}"
        )
        reach = (f"validation reached the paper's numbers at epoch {run['epoch_reaching_paper']} "
                 f"({run['wall_s_reaching_paper'] / 60:.1f} min)") if run["reached_paper_on_val"] \
            else "validation did not reach the paper's numbers within the budget"  # fmt: skip
        lines.append(f"{'':<12}{loss}: {reach}")
    lines.append(f"total wall time {results['total_wall_s'] / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
