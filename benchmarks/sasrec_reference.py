"""Plain-PyTorch SASRec reference on the paper's Amazon Video Games file (issue #5's BCE gap).

    python benchmarks/sasrec_reference.py --table-optimizer adam|adagrad [--init ours|xavier]
        [--epochs 200] [--minutes 30] [--val-every 5] [--test-every 10] [--stop-at-paper]
        [--tag NAME] [--work-dir runs/bench-sasrec-reference] [--out benchmarks/results/sasrec_reference.json]

One process, no TorchRec modules, no Lightning trainer: it exists to vary the item table's optimizer
(the paper's Adam, betas (0.9, 0.98), dense as in TF1, vs the fused Adagrad lr 0.05 that our CPU
TorchRec runs must use) and the initialisation, with everything else exactly ours:

* data: the dataset prepared by ``data.prepare.prepare_sasrec`` (the config's ``prepare: {kind:
  sasrec}``), :class:`data.sequential.SequenceSplits` (leave-one-out, per-position negatives drawn
  by ``train_batch`` from the same seeded streams, the same fixed evaluation negatives) and
  :class:`data.loaders.GlobalBatches` (the same shuffled 128-row batches, last short batch dropped);
* model: :class:`models.sasrec.SASRecEncoder` with the config's settings (``--encoder`` is
  ``model.block``, ``--init ours|xavier`` is ``model.init default|xavier``), over a plain
  ``nn.Embedding`` item table (row 0 zero and frozen, what the TorchRec lookup scatters at padding);
* loss: :meth:`trainer.sequential.SequentialModule.training_step` itself (BCE branch:
  ``bce_loss``, one sampled negative per target position, mean over the batch's positions), run on
  a module whose ``model`` is the reference model;
* evaluation: protocol 1 with ``single_target_metrics`` and ``TopKAccumulator`` on the last column,
  as ``SequentialModule._eval_step`` does.

Validation every ``--val-every`` epochs, test every ``--test-every`` (neither counted in the training
wall time). ``--stop-at-paper`` stops at the first test that reaches the paper's numbers (selection
on the test set, at ``--test-every`` granularity; the validation curve is reported alongside).
Results go to ``--out`` under ``runs[--tag]`` (other tags in the file are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.loaders import GlobalBatches  # noqa: E402
from data.sequential import NegativeSampling, SequenceBatch, SequenceSplits  # noqa: E402
from data.shards import PreparedDataset  # noqa: E402
from models.sasrec import PAD, SASRecConfig, SASRecEncoder  # noqa: E402
from trainer.sequential import SequentialModule, SequentialTaskConfig, sampled_scores  # noqa: E402
from trainer.topk_metrics import TopKAccumulator, metric_names, single_target_metrics  # noqa: E402

VIDEO = REPO.parent / "shared" / "data" / "sasrec_video" / "Video.txt"
PAPER = {"ndcg@10": 0.5360, "hr@10": 0.7410}  # Kang & McAuley 2018, Table III, "Games", 100 negatives
# configs/sasrec_video.yaml
MODEL = {"embedding_dim": 50, "max_len": 50, "num_blocks": 2, "num_heads": 1, "dropout": 0.5, "pre_ln": True}
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 1024
EVAL_NEGATIVES = 100
KS = (10,)


class ReferenceSASRec(nn.Module):
    """``SequentialRecommender``'s interface (``(seq, out_ids) -> (hidden, out)``) on ``nn.Embedding``."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding_dim = config.embedding_dim
        self.items = nn.Embedding(config.num_items, config.embedding_dim, padding_idx=PAD)
        self.encoder = SASRecEncoder(config)

    def forward(self, seq: torch.Tensor, out_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # row 0 is zero and never updated (padding_idx), so padding reads zeros, as the TorchRec lookup
        return self.encoder(self.items(seq), seq != PAD), self.items(out_ids)


def initialise(model: ReferenceSASRec) -> None:
    """The item table's U(-s, s) init of the TorchRec path (``SASRecConfig.item_init_scale``).

    The encoder initialises itself by ``model.init`` (``xavier``: the paper's TF1 code, Glorot-uniform
    position table and dense kernels, zero biases; the item table is Glorot-uniform too).
    """
    scale = model.config.item_init_scale()
    with torch.no_grad():
        model.items.weight.uniform_(-scale, scale)
        model.items.weight[PAD].zero_()


def make_optimizers(model: ReferenceSASRec, args: argparse.Namespace) -> list[torch.optim.Optimizer]:
    dense = [p for n, p in model.named_parameters() if not n.startswith("items.")]
    betas = (0.9, args.beta2)
    # TF1's Adam (the paper's) updates every row at every step, momentum included: torch's dense Adam
    if args.table_optimizer == "adam":
        table: torch.optim.Optimizer = torch.optim.Adam(
            [model.items.weight], lr=args.lr, betas=betas, eps=1e-8
        )
    elif args.table_optimizer == "adagrad":
        # what sparse_optimizer {name: adagrad} builds (torch.optim.Adagrad, eps 1e-8, accumulator 0);
        # a row without gradient does not move, as in FBGEMM's fused row-sparse update
        table = torch.optim.Adagrad([model.items.weight], lr=args.adagrad_lr, eps=1e-8)
    else:
        raise ValueError(f"--table-optimizer {args.table_optimizer!r}: choose adam or adagrad")
    return [table, torch.optim.Adam(dense, lr=args.lr, betas=betas, eps=1e-8)]


@torch.no_grad()
def evaluate(model: ReferenceSASRec, batches: list[SequenceBatch]) -> dict[str, float]:
    """Protocol 1, scored as ``SequentialModule._eval_step`` scores it (``sampled_scores``)."""
    model.eval()
    acc = TopKAccumulator(metric_names(KS, ("hr", "ndcg")))
    for batch in batches:
        hidden, out = model(batch.inputs, torch.cat([batch.targets, batch.negatives.reshape(-1)]))
        _, target_scores, negative_scores = sampled_scores(hidden, out, batch.negatives.shape[1])
        acc.update(single_target_metrics(target_scores, negative_scores, KS))
    model.train()
    values = acc.compute()
    return {k: round(v, 4) for k, v in values.items() if k != "users"} | {"users": int(values["users"])}


def partial_eval(splits: SequenceSplits, split: str) -> Callable[[np.ndarray], SequenceBatch]:
    return lambda rows: splits.eval_batch(rows, split)


def reached(metrics: dict[str, float]) -> bool:
    return all(metrics[k] >= v for k, v in PAPER.items())


def run(args: argparse.Namespace) -> dict[str, Any]:
    dataset = args.work_dir / "data" / "sasrec-video"
    if not (dataset / "meta.json").is_file():
        from data.prepare import prepare_sasrec

        prepare_sasrec(VIDEO, dataset)
    splits = SequenceSplits(PreparedDataset(dataset), MODEL["max_len"], seed=0, eval_negatives=EVAL_NEGATIVES,
                            negatives=SequentialTaskConfig(loss="bce").negative_sampling())  # fmt: skip
    assert splits.negatives == NegativeSampling("per_position")
    loader: GlobalBatches[SequenceBatch] = GlobalBatches(
        splits.rows["train"], BATCH_SIZE, lambda rows: rows, shuffle=True, seed=0, drop_last=True
    )
    loader.make_batch = lambda rows: splits.train_batch(rows, loader.sampler.epoch)
    # evaluation negatives are fixed per (split, user): build the batches once
    eval_sets = {
        split: list(GlobalBatches(splits.rows[split], EVAL_BATCH_SIZE, partial_eval(splits, split)))
        for split in ("val", "test")
    }

    torch.manual_seed(args.seed)
    init = {"ours": "default", "xavier": "xavier"}[args.init]
    config = SASRecConfig(num_items=splits.num_items, **MODEL, block=args.encoder, init=init)
    model = ReferenceSASRec(config)
    initialise(model)
    # the production training step, loss included, on the reference model (no Trainer attached:
    # its self.log calls are no-ops, and its global scale is 1 / positions in one process)
    step_module = SequentialModule(config, SequentialTaskConfig(loss="bce", eval_negatives=EVAL_NEGATIVES))
    step_module.model = model  # type: ignore[assignment]
    warnings.filterwarnings("ignore", message=".*self.log.*")
    optimizers = make_optimizers(model, args)
    model.train()

    print(f"[{args.tag}] table {args.table_optimizer}, init {args.init}, encoder {args.encoder}, "
          f"beta2 {args.beta2}; "
          f"{len(loader)} steps/epoch, {splits.num_items - 1} items", flush=True)  # fmt: skip
    curve: list[dict[str, Any]] = []
    tests: list[dict[str, Any]] = []
    train_wall, samples, positions, first = 0.0, 0, 0, None
    started = time.perf_counter()
    epoch = 0
    for epoch in range(1, args.epochs + 1):
        loader.sampler.set_epoch(epoch - 1)
        t0 = time.perf_counter()
        loss_sum, steps = 0.0, 0
        for i, batch in enumerate(loader):
            loss = step_module.training_step(batch, i)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            loss_sum += float(loss.detach())
            steps += 1
            samples += batch.batch_size
            positions += int((batch.targets != PAD).sum())
        epoch_s = time.perf_counter() - t0
        train_wall += epoch_s
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": round(loss_sum / steps, 4),
            "epoch_s": round(epoch_s, 1),
            "train_wall_s": round(train_wall, 1),
        }
        if epoch % args.val_every == 0 or epoch == args.epochs:
            row["val"] = evaluate(model, eval_sets["val"])
        curve.append(row)
        test = None
        out_of_time = train_wall >= args.minutes * 60
        if epoch % args.test_every == 0 or epoch == args.epochs or out_of_time:
            test = evaluate(model, eval_sets["test"])
            tests.append({"epoch": epoch, "train_wall_s": round(train_wall, 1), **test})
            if first is None and reached(test):
                first = tests[-1]
        print(f"[{args.tag}] epoch {epoch} loss {row['loss']} {epoch_s:.1f}s"
              + (f" val {row['val']['ndcg@10']}/{row['val']['hr@10']}" if "val" in row else "")
              + (f" TEST {test['ndcg@10']}/{test['hr@10']}" if test else ""), flush=True)  # fmt: skip
        if (first is not None and args.stop_at_paper) or out_of_time:
            break
        write(args, partial(args, curve, tests, first, train_wall, samples, positions, started, epoch))
    result = partial(args, curve, tests, first, train_wall, samples, positions, started, epoch)
    result["complete"] = True
    return result


def partial(args: argparse.Namespace, curve: list[dict[str, Any]], tests: list[dict[str, Any]],
            first: dict[str, Any] | None, train_wall: float, samples: int, positions: int, started: float,
            epoch: int) -> dict[str, Any]:  # fmt: skip
    return {
        "settings": {
            "table_optimizer": args.table_optimizer,
            "table_lr": args.lr if args.table_optimizer == "adam" else args.adagrad_lr,
            "dense_optimizer": f"adam lr {args.lr} betas (0.9, {args.beta2})",
            "adam_betas": [0.9, args.beta2],
            "init": args.init,
            "encoder": args.encoder,
            "seed": args.seed,
            "model": MODEL,
            "batch_size": BATCH_SIZE,
            "loss": "bce (1 negative per position)",
            "max_epochs": args.epochs,
            "budget_minutes": args.minutes,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "epochs": epoch,
        "train_wall_s": round(train_wall, 1),
        "samples_per_sec": round(samples / train_wall, 1) if train_wall else None,
        "positions_per_sec": round(positions / train_wall, 1) if train_wall else None,
        "total_wall_s": round(time.perf_counter() - started, 1),
        "reached_paper_on_test": first is not None,
        "first_test_reaching_paper": first,
        "val_curve": curve,
        "tests": tests,
        "complete": False,
    }


def write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    out: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out.setdefault("benchmark", "sasrec_reference")
    out["paper"] = PAPER
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    out.setdefault("runs", {})[args.tag] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-optimizer", choices=("adam", "adagrad"), required=True)
    p.add_argument("--init", choices=("ours", "xavier"), default="ours")
    p.add_argument(
        "--encoder",
        choices=("ours", "paper"),
        default="ours",
        help="model.block: ours (SASRecBlock) or paper (PaperSASRecBlock, the TF1 code's block)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's rate (dense, and the table with adam)")
    p.add_argument("--beta2", type=float, default=0.98, help="Adam's beta2 (the paper's code: 0.98)")
    p.add_argument("--adagrad-lr", type=float, default=0.05, help="the table's rate with adagrad")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget")
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--test-every", type=int, default=10)
    p.add_argument("--stop-at-paper", action="store_true", help="stop at the first test reaching the paper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None, help="key under runs in --out (default: table-init)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-sasrec-reference")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sasrec_reference.json")
    args = p.parse_args()
    for name in ("epochs", "val_every", "test_every", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    args.tag = args.tag or f"{args.table_optimizer}-{args.init}-{args.encoder}"
    if not VIDEO.is_file():
        print(f"skipped: {VIDEO} not found", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    result = run(args)
    write(args, result)
    t = result["tests"][-1]
    print(f"[{args.tag}] {result['epochs']} epochs, {result['train_wall_s'] / 60:.1f} min training, "
          f"{result['samples_per_sec']} samples/s: test NDCG@10 {t['ndcg@10']} HR@10 {t['hr@10']} "
          f"(paper {PAPER['ndcg@10']} / {PAPER['hr@10']}); "
          f"reached: {result['reached_paper_on_test']}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
