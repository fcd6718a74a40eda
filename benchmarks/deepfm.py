"""DeepFM benchmark: funnel (TorchRec + FBGEMM, sharded, Lightning) vs plain PyTorch, same run.

For each dataset (synthetic world `small`, and MovieLens-100K CTR when ../shared/data is there) it
trains
  * funnel's DeepFM through the real entry point (`python -m trainer` under torchrun) on 1 and on
    2 CPU ranks: FBGEMM table-batched embedding kernels with fused row-wise Adagrad, TorchRec
    sharding, Lightning loop; and on 2 ranks through TorchRec's sparse-dist train pipeline
    (`trainer.pipeline=on`, the CUDA default);
  * the same architecture in plain PyTorch: `nn.EmbeddingBag` tables, torch Adagrad on the
    embeddings (sparse gradients) and Adam on the dense part, a bare training loop;
with the same global batches, epochs and learning rates, and prints/writes AUC, log loss and
training samples/s. Usage: `python benchmarks/deepfm.py [--epochs 3] [--out benchmarks/results/deepfm.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.ctr import CTRDataModule  # noqa: E402
from models.deepfm import FIRST_ORDER_COLUMNS, DeepFM, DeepFMConfig  # noqa: E402
from trainer.metrics import binary_auc, log_loss  # noqa: E402

MODEL = {"embedding_dim": 16, "dense_arch": [64], "deep_arch": [256, 128, 64]}


class PlainEmbeddingBags(nn.Module):
    """``nn.EmbeddingBag`` per feature with the EBC's interface (KJT in, dict of pooled out)."""

    def __init__(self, cfg: DeepFMConfig) -> None:
        super().__init__()
        self.bags = nn.ModuleDict(
            {
                name: nn.EmbeddingBag(
                    rows,
                    cfg.embedding_dim + FIRST_ORDER_COLUMNS,
                    mode="sum",  # DeepFM.forward averages multi-valued bags itself
                    sparse=True,
                    include_last_offset=True,
                )
                for name, rows in cfg.sparse_features.items()
            }
        )
        for bag in self.bags.values():
            nn.init.uniform_(bag.weight, -((1 / bag.num_embeddings) ** 0.5), (1 / bag.num_embeddings) ** 0.5)

    def forward(self, kjt: Any) -> Any:
        out = {}
        for name, jt in kjt.to_dict().items():
            out[name] = self.bags[name](jt.values(), jt.offsets())
        return _Pooled(out)


class _Pooled(dict):
    def to_dict(self) -> dict[str, torch.Tensor]:
        return self


def model_config(dm: CTRDataModule) -> DeepFMConfig:
    s = dm.schema
    return DeepFMConfig(
        sparse_features={f.name: f.vocab for f in s.sparse},
        num_dense=len(s.dense),
        multi_valued=[f.name for f in s.sparse if f.multi_valued],
        **MODEL,
    )


def run_plain(
    dataset: Path, epochs: int, batch_size: int, sparse_lr: float, dense_lr: float
) -> dict[str, float]:
    torch.manual_seed(0)
    dm = CTRDataModule(dataset, batch_size=batch_size, eval_batch_size=16384, seed=0)
    cfg = model_config(dm)
    model = DeepFM(cfg, device=torch.device("cpu"))
    model.sparse_arch = PlainEmbeddingBags(cfg)
    sparse = list(model.sparse_arch.parameters())
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    sparse_opt = torch.optim.Adagrad(sparse, lr=sparse_lr)
    dense_opt = torch.optim.Adam(dense, lr=dense_lr)
    loader = dm.loader("train")
    rows, seconds = 0, 0.0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            loss = F.binary_cross_entropy_with_logits(
                model(batch.dense_features, batch.sparse_features), batch.labels
            )
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
            rows += len(batch.labels)
        seconds += time.perf_counter() - t0
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for batch in dm.loader("test"):
            probs.append(torch.sigmoid(model(batch.dense_features, batch.sparse_features)))
            labels.append(batch.labels)
    p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return {
        "test/auc": binary_auc(p, y),
        "test/logloss": log_loss(p, y),
        "samples_per_sec": rows / seconds,
        "train_seconds": seconds,
    }


def run_funnel(
    dataset: Path,
    nproc: int,
    epochs: int,
    batch_size: int,
    sparse_lr: float,
    dense_lr: float,
    work: Path,
    pipeline: str = "off",
) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    name = f"{nproc}rank" + ("-pipelined" if pipeline == "on" else "")
    run_dir = work / f"funnel-{name}"
    cfg = {
        "model_name": "deepfm",
        "model": MODEL,
        "data": {"path": str(dataset), "batch_size": batch_size, "eval_batch_size": 16384, "seed": 0},
        "optimizer": {"name": "adam", "lr": dense_lr},
        "sparse_optimizer": {"name": "adagrad", "lr": sparse_lr},
        "trainer": {
            "max_epochs": epochs,
            "enable_progress_bar": False,
            "log_every_n_steps": 50,
            "limit_val_batches": 0,
            "pipeline": pipeline,
        },
        "logger": {"kind": "none"},
        "run_dir": str(run_dir),
    }
    cfg_path = work / f"deepfm-{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "trainer",
        "--config",
        str(cfg_path),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
        "WANDB_MODE": "disabled",
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    m = summary["metrics"]
    return {
        "test/auc": m["test/auc"],
        "test/logloss": m["test/logloss"],
        "samples_per_sec": summary["samples_per_sec"],
        "train_seconds": summary["fit_seconds"],
    }


def prepare(kind: str, work: Path) -> Path | None:
    from launch.cli import main as funnel

    out = work / f"data-{kind}"
    if (out / "meta.json").exists():
        return out
    if kind == "synthetic-small":
        args = ["data", "prepare", "synthetic", "--preset", "small", "--out", str(out)]
    else:
        src = REPO.parent / "shared" / "data" / "movielens-100k"
        if not src.is_dir():
            return None
        args = ["data", "prepare", "movielens", "--input", str(src), "--out", str(out)]
    if funnel(args):
        raise RuntimeError(f"funnel {' '.join(args)} failed")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--sparse-lr", type=float, default=0.05)
    p.add_argument("--dense-lr", type=float, default=1e-3)
    p.add_argument("--work", default=str(REPO / "runs" / "bench-deepfm"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deepfm.json"))
    p.add_argument("--datasets", default="synthetic-small,ml-100k")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": vars(args),
        "datasets": {},
    }
    for kind in args.datasets.split(","):
        dataset = prepare(kind, work)
        if dataset is None:
            print(f"skipping {kind}: data not found")
            continue
        common = (args.epochs, args.batch_size, args.sparse_lr, args.dense_lr)
        row = {
            "plain_pytorch_1proc": run_plain(dataset, *common),
            "funnel_1rank": run_funnel(dataset, 1, *common, work / kind),
            "funnel_2rank": run_funnel(dataset, 2, *common, work / kind),
            # TorchRec's TrainPipelineSparseDist (the CUDA default) on CPU: no streams, so no overlap;
            # this row measures what the pipeline's bookkeeping costs where it cannot help
            "funnel_2rank_pipelined": run_funnel(dataset, 2, *common, work / kind, pipeline="on"),
        }
        base = row["plain_pytorch_1proc"]["samples_per_sec"]
        for name in ("funnel_1rank", "funnel_2rank", "funnel_2rank_pipelined"):
            row[name]["speedup_vs_plain"] = row[name]["samples_per_sec"] / base
        bayes = None
        meta = json.loads((dataset / "meta.json").read_text())
        if "ground_truth" in meta:
            bayes = meta["ground_truth"]["bayes_auc"]["test"]
        row["bayes_auc_test"] = bayes
        results["datasets"][kind] = row
        print(f"\n== {kind} ==" + (f"  (Bayes-optimal test AUC {bayes:.4f})" if bayes else ""))
        print(f"{'variant':<24}{'test AUC':>10}{'logloss':>10}{'samples/s':>12}{'speed-up':>10}")
        for name, r in row.items():
            if isinstance(r, dict):
                print(
                    f"{name:<24}{r['test/auc']:>10.4f}{r['test/logloss']:>10.4f}{r['samples_per_sec']:>12,.0f}"
                    f"{r.get('speedup_vs_plain', 1.0):>10.2f}"
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
