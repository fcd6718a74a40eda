"""SASRec on the paper's Amazon Video Games file: full-softmax cross-entropy, then the paper's BCE.

    python benchmarks/sasrec.py [--ce-minutes 45] [--bce-minutes 45] [--chunk-epochs 3] [--ranks 2]
                                [--losses ce,bce] [--out benchmarks/results/sasrec.json] [--set KEY=VALUE ...]

Trains ``configs/sasrec_video.yaml`` (d=50, 2 blocks, 1 head, max length 50, dropout 0.5, batch 128,
lr 1e-3, the paper's block and init, the item table data-parallel on Adam) through the real entry
point on ``--ranks`` CPU ranks, with full-softmax cross-entropy (SASRec+; distributed log-sum-exp)
and with the paper's BCE loss (one sampled negative per position). Training runs in chunks of
``--chunk-epochs`` epochs (``--resume auto``); validation after each epoch uses protocol 1 only (100
sampled negatives; cheap), and after each chunk its checkpoint is tested on protocol 1
(``--evaluate``, not part of the training wall time). A loss stops when that test reaches the
paper's numbers (Table III: NDCG@10 0.5360, HR@10 0.7410 with 100 sampled negatives) or its time
budget is spent; its last checkpoint is then tested on both protocols. Reported per loss: epochs,
training wall time, samples/s, the per-epoch validation curve, the test after each chunk, the epoch
and training wall time at which the test first reached the paper's numbers (chunk granularity; the
per-epoch validation curve says when validation did), the final test metrics of both protocols, next
to the popularity baseline and the paper.

Which optimizer trains the item table is the config's: the paper uses Adam for every parameter, and
FBGEMM's CPU kernels have no fused Adam (``Optimizer adam is not supported in CPU mode``). A
``data_parallel`` item table (``--set 'sharding.tables.item.sharding_types=[data_parallel]'``) is
replicated on every rank and trained by the dense optimizer, so ``--set 'optimizer.betas=[0.9,0.98]'``
makes it the paper's Adam (betas of its code); TorchRec runs such a table through FBGEMM's dense
lookup, which pools even unpooled lookups on CPU, and :func:`trainer.sharding.exact_cpu_unpooled_lookups`
replaces that lookup on CPU. A row-wise table trains with the fused in-backward optimizer
(``sparse_optimizer``: Adagrad on CPU; Adam on CUDA). The JSON records which.

Wall times are of this machine as it is: other jobs share its 2 cores, so they are pessimistic; the
load average at each chunk is recorded. Nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
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
from trainer.overrides import add_override_argument  # noqa: E402
from trainer.sharding import TableSharding  # noqa: E402

CONFIG = REPO / "configs" / "sasrec_video.yaml"
VIDEO = REPO.parent / "shared" / "data" / "sasrec_video" / "Video.txt"
PAPER = {"sampled_ndcg@10": 0.5360, "sampled_hr@10": 0.7410}  # Kang & McAuley 2018, Table III, "Games"
MAX_LEN = 50


def torchrun(args: list[str], log: Path, ranks: int) -> float:
    """Run ``python -m trainer`` on ``ranks`` CPU processes; returns the wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
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


def reached(metrics: dict[str, float], prefix: str) -> bool:
    return all(metrics[f"{prefix}{k}"] >= v for k, v in PAPER.items())


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def test_checkpoint(common: dict[str, Any], run_dir: Path, out_dir: Path, log: Path, ranks: int, *,
                    full: bool, extra: list[str]) -> tuple[dict[str, float], float]:  # fmt: skip
    """Test metrics of ``run_dir``'s final checkpoint (protocol 1; protocol 2 too when ``full``)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    overrides = sets({**common, "run_dir": str(out_dir), "model.test_full_ranking": full})
    checkpoint = run_dir / "checkpoints" / "final.ckpt"
    wall = torchrun([*overrides, *extra, "--evaluate", str(checkpoint)], log, ranks)
    metrics = json.loads((out_dir / "evaluation.json").read_text())["metrics"]
    return {k.removeprefix("test/"): round(v, 4) for k, v in sorted(metrics.items())}, wall


def train_loss(loss: str, minutes: float, chunk: int, work: Path, dataset: Path, ranks: int,
               extra: list[str]) -> dict[str, Any]:  # fmt: skip
    run_dir = work / f"sasrec-video-{loss}"
    log = work / f"{loss}.log"
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists; remove it (or pass another --work-dir) for a fresh run")
    common = {"data.path": str(dataset), "run_dir": str(run_dir), "model.loss": loss,
              "model.validate_full_ranking": False, "trainer.test_after_fit": False,
              "trainer.enable_progress_bar": False}  # fmt: skip
    chunks: list[dict[str, Any]] = []
    epochs, train_wall, train_samples, train_seconds, eval_wall = 0, 0.0, 0.0, 0.0, 0.0
    first: dict[str, Any] | None = None
    while train_wall < minutes * 60:
        epochs += chunk
        load_before = load_average()
        wall = torchrun([*sets({**common, "trainer.max_epochs": epochs}), *extra, "--resume", "auto"], log,
                        ranks)  # fmt: skip
        load_after = load_average()
        summary = json.loads((run_dir / "summary.json").read_text())
        train_wall += wall
        steps = summary["global_step"] - sum(c["steps"] for c in chunks)
        train_samples += steps * 128
        train_seconds += summary["fit_seconds"]
        check_dir = work / f"sasrec-video-{loss}-check"
        test, test_wall = test_checkpoint(common, run_dir, check_dir, log, ranks, full=False, extra=extra)
        eval_wall += test_wall
        chunks.append({"epochs": epochs, "steps": steps, "wall_s": round(wall, 1),
                       "fit_s": summary["fit_seconds"], "samples_per_sec": summary["samples_per_sec"],
                       "train_wall_s_total": round(train_wall, 1), "load_average": [load_before, load_after],
                       "test/sampled_ndcg@10": test["sampled_ndcg@10"],
                       "test/sampled_hr@10": test["sampled_hr@10"],
                       "test_wall_s": round(test_wall, 1)})  # fmt: skip
        curve = validation_curve(run_dir)
        last = curve[-1] if curve else {}
        print(
            f"[{loss}] {epochs} epochs, {train_wall / 60:.1f} min training, load {load_after}: val {last}, "
            f"test sampled NDCG@10 {test['sampled_ndcg@10']} HR@10 {test['sampled_hr@10']}",
            flush=True,
        )
        if reached(test, "") and first is None:
            first = chunks[-1]
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
    first_val = next((r for r in curve if reached(r, "val/")), None)
    test_dir = work / f"sasrec-video-{loss}-test"
    test, test_wall = test_checkpoint(common, run_dir, test_dir, log, ranks, full=True, extra=extra)
    return {
        "loss": loss,
        "epochs": epochs,
        "train_wall_s": round(train_wall, 1),
        "train_fit_s": round(train_seconds, 1),
        "samples_per_sec": round(train_samples / train_seconds, 1) if train_seconds else None,
        "progress_test_wall_s": round(eval_wall, 1),
        "test_eval_wall_s": round(test_wall, 1),
        "reached_paper_on_test": first is not None,
        "epoch_reaching_paper": first["epochs"] if first else None,
        "train_wall_s_reaching_paper": first["train_wall_s_total"] if first else None,
        "val_reached_paper_at_epoch": first_val["epoch"] if first_val else None,
        "val_curve": [{**r, "wall_s": round(at_epoch.get(r["epoch"], float("nan")), 1)} for r in curve],
        "chunks": chunks,
        "test": test,
    }


def optimizers(overrides: list[str]) -> dict[str, str]:
    """Which optimizer trains the dense layers and which the item table, as this run configures them."""
    from trainer.config import load_config

    cfg = load_config(CONFIG, overrides)
    dense = f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g}"
    if cfg.optimizer.name in ("adam", "adamw"):
        dense += f" betas {list(cfg.optimizer.betas)}"
    types = (cfg.sharding.tables.get("item") or TableSharding()).sharding_types or cfg.sharding.sharding_types
    if types == ["data_parallel"]:
        table = f"data_parallel: replicated, trained by the dense optimizer ({dense})"
    else:
        table = f"{'/'.join(types)}: fused {cfg.sparse_optimizer.name} lr {cfg.sparse_optimizer.lr:g}"
    return {"dense_optimizer": dense, "item_table": table}


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
    p.add_argument("--ce-minutes", type=float, default=45.0, help="training wall-time budget of the CE run")
    p.add_argument("--bce-minutes", type=float, default=45.0, help="training wall-time budget of the BCE run")
    p.add_argument("--losses", default="ce,bce", help="comma-separated, in order: ce, bce")
    p.add_argument("--chunk-epochs", type=int, default=3, help="epochs per torchrun (resumed between chunks)")
    p.add_argument("--ranks", type=int, default=2, help="CPU processes")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-sasrec")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sasrec.json")
    add_override_argument(p, "model.loss=ce")  # --set, for training and testing
    args = p.parse_args()
    if not VIDEO.is_file():
        print(f"skipped: {VIDEO} not found", file=sys.stderr)
        return 0
    losses = [x for x in args.losses.split(",") if x]
    budgets = {"ce": args.ce_minutes, "bce": args.bce_minutes}
    if not losses or set(losses) - set(budgets):
        p.error(f"--losses {args.losses!r}: choose from {sorted(budgets)}")
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
        "settings": {"config": str(CONFIG.relative_to(REPO)), "ranks": args.ranks, "device": "cpu",
                     "embedding_dim": 50, "num_blocks": 2, "num_heads": 1, "max_len": MAX_LEN, "dropout": 0.5,
                     "batch_size": 128, **optimizers(args.overrides),
                     "budget_minutes": {k: budgets[k] for k in losses}, "chunk_epochs": args.chunk_epochs,
                     "validation": "protocol 1 (100 sampled negatives) every epoch",
                     "stopping": "test protocol 1 after each chunk reaches the paper, or the budget is spent",
                     "test": "the last checkpoint, both protocols", "overrides": args.overrides},
        "paper": {"sampled_ndcg@10": PAPER["sampled_ndcg@10"], "sampled_hr@10": PAPER["sampled_hr@10"]},
        "popularity": popularity(dataset),
        "runs": {},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "note": "shared with other jobs; see each chunk's load_average (2 = both cores busy)"},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    for loss in losses:
        results["runs"][loss] = train_loss(loss, budgets[loss], args.chunk_epochs, args.work_dir, dataset,
                                           args.ranks, extra)  # fmt: skip
        results["total_wall_s"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(results, indent=2))  # after each loss: a long run keeps what it has
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
            f"{'SASRec ' + loss:<12}"
            + "".join(f"{run['test'].get(c, float('nan')):>16.4f}" for c in cols)
            + f"{run['epochs']:>8}{run['train_wall_s'] / 60:>11.1f}{run['samples_per_sec'] or 0:>11.0f}"
        )
        reach = "test did not reach the paper's numbers within the budget"
        if run["reached_paper_on_test"]:
            reach = (
                f"test reached the paper's numbers after {run['epoch_reaching_paper']} epochs "
                f"({run['train_wall_s_reaching_paper'] / 60:.1f} min of training)"
            )
        lines.append(f"{'':<12}{loss}: {reach}")
    lines.append(f"total wall time {results['total_wall_s'] / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
