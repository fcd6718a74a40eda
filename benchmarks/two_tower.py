"""Two-tower retrieval benchmark: ML-1M (LCF/UltraGCN split) with an ablation, ML-100K against
popularity and matrix factorisation, and FAISS index build time / QPS / recall.

* ML-1M (`../shared/data/movielens-1m-ultragcn`, train/test as given): full-ranking Recall@20 and
  NDCG@20 of funnel's two-tower (configs/two_tower_ml1m.yaml), trained through the real entry point
  (`python -m trainer` under torchrun, sharded tables, Lightning), trained for `--ml1m-epochs`.
  Ablation, every variant trained for `--ablation-epochs` (by default the same): full (in-batch
  softmax with logQ, cross-rank negatives and cosine learning-rate decay, 2 ranks), without logQ,
  with 1,024 uniform (mixed) negatives added to the pool, without the cross-rank gather (2 ranks:
  each rank's pool is its half of the batch), with constant learning rates, and the full model on
  1 rank (the same pool as 2 ranks with the gather).
  Beside the ablation, `configs/two_tower_ml1m_multinomial.yaml` (the multinomial loss over the whole
  catalog, rounds 6 and 7 below) on 2 ranks for `--multinomial-epochs`.

  The config was tuned on a validation split carved from train (`--set model.val_fraction=0.1`: 10%
  of each user's training items held out; test never looked at while tuning), one lever at a time;
  validation Recall@20 at the best epoch, 1 rank unless said (2 ranks with the gather give the same
  pool). Round 1, from a 64-d table shared by history and item tower, temperature 0.1, logQ weight 1,
  100-item queries (0.2211): queries averaging all the user's items 0.2236; 128-d 0.2322; a history
  table of its own 0.2364; logQ weight 0.8 / 1.2 / 1.5 / 2.0: 0.2311 / 0.2382 / 0.2392 / 0.2319;
  temperature 0.07 with weight 1.3 and 1,024 uniform negatives: 0.2396 (2 ranks, epoch 5; test
  0.2611). No gain then: temperature 0.05 / 0.2, 4,096 uniform negatives, a 2,048 batch, 256-d, a
  256-unit hidden layer, 300-item training histories, sparse lr 0.05 / 0.3 or Adam, dense lr 1e-2,
  embedding dropout, per-user loss weights, weight decay on the tables (FBGEMM's CPU kernels turned
  out to ignore it, so that run differed by noise only; such configs are now refused).
  Round 2 (issue #4; val = this split, test run once per candidate on 2 ranks): in-batch negatives
  only (no uniform ones) 0.2413 at epoch 6, adopted; cosine decay of all learning rates
  (`lr_schedule: {decay: cosine, decay_to: 0}`) over 6 epochs 0.2409, over 8 epochs 0.2426 at
  epoch 6 / 0.2415 at 8;
  with it logQ weight 1.5: 0.2418 (test 0.2628 / NDCG@20 0.2504), 1.8: 0.2285 at epoch 3
  (stopped); then a user-id table next to the history bag (the linear projection learns SimpleX's
  gamma blend) with an L2 penalty on its rows (`model.loss.user_l2`, SimpleX's embedding
  regulariser): 0.01: 0.2383 at epoch 3 then 0.2357, 0.1: 0.2367 at epoch 4 then 0.2272 (overfits),
  0.3: 0.2408 at epoch 5 then 0.2390, 1.0: 0.2426 at epoch 6 (test 0.2634 / NDCG@20 0.2523); the
  decay stretched over 8 epochs: 0.2436 at epoch 7, 0.2434 at 8, the final config (test 0.2629 /
  NDCG@20 0.2519). Each of these steps is about run-to-run noise: the three tested candidates are
  level on test. Level (within ~0.001): temperature 0.05 0.2429; a 512 batch 0.2418; a learned
  per-item score bias (an option since removed) 0.2411 at epoch 5 with logQ weight 1.5 (0.2370 at epoch 4
  then 0.2352 with weight 1: it does not replace the prior); history-item dropout
  (`model.history_dropout`) 0.5 at constant lr 0.2404 after 8 epochs (slower, no higher), 0.25 with
  an 8-epoch decay 0.2424, the same at 256-d 0.2351 at epoch 3 like 128-d (stopped). Worse: items
  keeping their norm (an option since removed: 0.2393 at epoch 3 then 0.2358); SimpleX's
  cosine contrastive loss (`model.loss.kind: ccl`) against 1,024 uniform negatives per batch
  (`in_batch_negatives: false`): margin 0.9 / negative weight 150 0.0167 after 1 epoch, margin
  0.5 / weight 20 0.0876 after 2 (stopped). That is not SimpleX's ML-1M recipe, which could not be
  found (RecZoo's `SimpleX_movielens1m_m1` config is not in the reachable index); SimpleX pairs CCL
  with ~1,000 negatives per positive and 20+ epochs with lr reduction. logQ frequencies estimated
  online (`model.loss.logq_source: streaming`, trainer.logq) instead of counted: 0.2416 vs 0.2409
  (6-epoch decay, weight 1.3, no user id).
  Round 3: UltraGCN's item-item constraint (its L_I term) as a training regulariser, the model a
  plain two-tower at serving time. Each item's top-K neighbours by UltraGCN's
  w_ij = G_ij / (g_i - G_ii) * sqrt(g_i / g_j) (G = A^T A of the carved training split only); per
  positive (u, i), lambda * sum_j w_ij * -log(e^{s_uj} / (e^{s_uj} + sum of u's pool negatives)),
  the neighbours embedded by the item tower in the same step (s_uj logQ-corrected like the pool).
  On ML-1M sum_j w_ij is ~0.014 per positive and the neighbours are popular (mean popularity
  rank in the top 10% vs 22% for the positives; 47% are already training positives of the user).
  Reference this round (the final config, re-run): 0.2368 / 0.2391 / 0.2414 at epochs 3 / 4 / 5,
  0.2436 at 7, 0.2434 at 8 (NDCG@20 0.1956). K 10: lambda 10 0.2209 at epoch 4 (stopped), 2
  0.2375 at epoch 5 (stopped), 0.5 0.2426 at 8 (NDCG@20 0.1958); lambda 2 on only the neighbours
  the user has not trained on 0.2330 at epoch 3 (stopped), without logQ on the neighbours 0.2356 at
  epoch 4 (stopped); K 3, lambda 2: 0.2434 at 8 (NDCG@20 0.1954). Worse in proportion to lambda at
  every epoch, level at best: removed. Fit 480-531 s against 435 s for the reference (1 rank, 8 epochs).
  Round 4 (`benchmarks/mf_ccl.py`, plain PyTorch MF on the same carve, our metrics): SimpleX's loss
  (CCL) with its published settings (margin 0.9, negative weight 150, 1,000 negatives per positive)
  collapses in plain MF too (0.025 after 2 epochs, 0.093 at best: below popularity's 0.108), so the
  round-2 collapse was the recipe, not our CCL code. Tuned: margin 0.6, weight 10, lr 5e-3 with an
  8-epoch cosine decay: validation 0.2226 (128-d 0.2257), test 0.2383 / NDCG@20 0.2143; negatives
  per positive or shared by the batch level (0.2226 / 0.2220); the same MF with full softmax 0.2167.
  Below the two-tower's 0.2434 / 0.2629: the loss does not close the gap to UltraGCN, not ported.
  Round 5 (`benchmarks/item_item_ceiling.py`): the model family's ceiling. EASE, the best full-rank
  linear item-item model (lambda 500 picked on the carve), gets validation 0.2498 / test 0.2759, below
  UltraGCN's 0.2787; truncated to rank 128 (the two-tower's width) 0.2475 / 0.2721. The two-tower
  (0.2434 / 0.2629) is 0.004 / 0.009 under the rank-128 optimum of its own family.
  Round 6: Mult-DAE's training in the two-tower (`configs/two_tower_ml1m_multinomial.yaml`,
  `model.loss.kind: multinomial`): a row per user, the bag of all their training items thinned by
  input dropout, the multinomial likelihood of those items under a softmax over the whole catalog.
  First in plain PyTorch (validation, 40-50 epochs, Adam): Mult-DAE as published 0.2472; RecVAE
  (Shenbin et al., WSDM 2020: composite prior, dense encoder, alternating updates) 0.2508 at 50
  epochs, 0.2499 at 60; Mult-DAE with the two-tower's scoring (L2-normalised towers, temperature 0.1,
  no item bias) 0.2514, also with a linear user tower (no tanh, no weight decay) 0.2522 and with a
  mean-pooled bag 0.2524; the same at 128-d 0.2391; with a linear projection on each side 0.2374.
  Then in funnel (1 rank, 40 epochs, tables row-wise, cosine decay): 128-d with projections and
  row-wise Adagrad 0.1 0.2346; 600-d with projections 0.2133 (data-parallel tables under Adam
  0.2349); 600-d without projections (`model.projection: false`) 0.2448; element-wise Adagrad 0.05
  0.2508 (0.02: 0.2503; row-wise 0.05 / 0.2: 0.2485 / 0.2411); temperature 0.07 / 0.15 / 0.2:
  0.2396 / 0.2528 / 0.2461; at 0.15, input dropout 0.3 / 0.7: 0.2541 / 0.2519; at 0.3, dropout 0.2
  0.2540, temperature 0.12 0.2539, 800-d 0.2539; the decay over 60 epochs 0.2563, over 100 0.2564
  (the config: 60); then 250 users a batch 0.2567 (level), 1,000 0.2519; Adagrad 0.1 / 0.03 0.2556 /
  0.2563 (level); one item table shared by the bag and the item tower 0.2558 (level).
  Level (within ~0.002, plain PyTorch): each user's loss divided by the square
  root or the size of their history (0.2545 / 0.2533 against 0.2530). Test once, 2 ranks: 0.2758 /
  NDCG@20 0.2599 (in-batch config 0.2629 / 0.2519; EASE 0.2759; UltraGCN 0.2787); initialisation
  seeds 1 / 2 after that: 0.2773 / 0.2757 (mean of three 0.2763).
  Round 7 (issue #4, the multinomial recipe; first in a plain-PyTorch copy of it on a carve of its own,
  whose baseline is validation 0.2613 / 0.2607 over seeds 0 / 1 and test 0.2750, funnel's 0.2758):
  a user-id row blended into the user vector, w * normalise(user row) + normalise(history mean)
  (`model.user_blend`, SimpleX's gamma blend with a fixed weight, no projection): w 0.15 / 0.25 /
  0.35 / 0.5 / 1.0: 0.2644 / 0.2644 and 0.2644 (seeds 0, 1) / 0.2642 / 0.2628 and 0.2636 / 0.2625,
  NDCG@20 +0.004 at every weight; adopted at 0.25. A learned per-item score bias (its Adagrad rate x0.3
  / x1 / x3): 0.2618 / 0.2639 and 0.2617 / 0.2634, nothing on top of the user row (0.2637 / 0.2635
  with w 0.5), and it would put a bias column into the exported vectors: not adopted. Worse or level:
  the user's other training items taken out of each positive's softmax denominator 0.2586; the
  dropped-out targets weighted 2x 0.2599; ranking by score - beta * log(popularity), beta 0.05 /
  -0.05: 0.2593 / 0.2627; history bags weighted by popularity^-0.25 / ^0.25: 0.2602 / 0.2592; the
  summed scores of two seeds (an ensemble) 0.2621; with the user row, dropout 0.2 / 0.5: 0.2631 /
  0.2634, temperature 0.12 / 0.18: 0.2644 / 0.2600, Adagrad 0.03 0.2633, 80 epochs 0.2632, 800-d
  0.2636, 250 users a batch 0.2648 (level: the plateau of this round). (The lab's test split was run
  for the bias x3 and the user row at w 0.5, to see that the validation gains carry over: 0.2803 and
  0.2832; the weight was picked on validation.) In funnel,
  2 ranks: validation 0.2563 -> 0.2601 (NDCG@20 0.2086). Test once, 2 ranks: 0.2810 / NDCG@20 0.2667
  (UltraGCN 0.2787 / 0.2642, SimpleX 0.2802 / 0.2670); initialisation seeds 1 / 2 after that: 0.2808 /
  0.2663 and 0.2810 / 0.2658 (mean of three 0.2809 / 0.2663).
* ML-100K (leave-one-out): Recall@10/20/50 and NDCG@10 of the two-tower (2 ranks), the popularity
  ranking (computed by the same run) and plain PyTorch BPR matrix factorisation trained here.
* Indexes: `funnel export retrieval` of the ML-1M model, then Flat / IVF-Flat / IVF-PQ / HNSW (the
  IndexConfig defaults, pq_m 8) over its item embeddings with the exported encoder's user embeddings
  as queries, and over the latent item vectors of the synthetic world `medium` (40,000 items, user
  latents as queries), a catalog large enough for approximate search to start paying off.

Usage: `python benchmarks/two_tower.py [--ml1m-epochs 8] [--ablation-epochs 8] [--ml100k-epochs 5]`;
prints a summary and writes benchmarks/results/two_tower.json. Defaults take about 48 minutes on
2 CPU cores (~7 minutes per 8-epoch ML-1M run; see the `seconds` entries of the JSON).
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.retrieval import RetrievalDataModule  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.faiss_export import IndexConfig, build_index, evaluate_index  # noqa: E402
from trainer.retrieval import build_two_tower, encode_queries  # noqa: E402
from trainer.topk_metrics import TopKAccumulator, mask_scores, metric_names, topk_metrics_from_scores  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
PUBLISHED_ML1M = {
    "LightGCN": {"recall@20": 0.2576, "ndcg@20": 0.2427},
    "UltraGCN": {"recall@20": 0.2787, "ndcg@20": 0.2642},
    "SimpleX": {"recall@20": 0.2802, "ndcg@20": 0.2670},
}
HEADLINE = "full (2 ranks)"
SHORT = "full (2 ranks), short"
ABLATION = {
    HEADLINE: (2, []),
    SHORT: (2, []),
    "no logQ": (2, ["model.loss.logq_correction=false"]),
    "with 1,024 mixed negatives": (2, ["model.loss.num_negatives=1024"]),
    "no cross-rank negatives": (2, ["model.loss.cross_rank_negatives=false"]),
    "constant learning rates": (2, ["lr_schedule.decay=constant"]),
    "full (1 rank)": (1, []),
}
# not an ablation of the in-batch model: the Mult-DAE-style recipe, users against the whole catalog
MULTINOMIAL = "multinomial, full catalog (2 ranks)"
VARIANTS = [*ABLATION, MULTINOMIAL]


def funnel(args: list[str]) -> None:
    from launch.cli import main

    if main(args):
        raise RuntimeError(f"funnel {' '.join(args)} failed")


def prepare(work: Path) -> dict[str, Path]:
    out = {}
    ml1m = SHARED / "movielens-1m-ultragcn"
    if ml1m.is_dir():
        out["ml-1m"] = work / "data-ml-1m-ultragcn"
        if not (out["ml-1m"] / "meta.json").exists():
            funnel(["data", "prepare", "user-items", "--input", str(ml1m / "train.txt"),
                    "--test-file", str(ml1m / "test.txt"), "--out", str(out["ml-1m"])])  # fmt: skip
    ml100k = SHARED / "movielens-100k"
    if ml100k.is_dir():
        out["ml-100k"] = work / "data-ml-100k"
        if not (out["ml-100k"] / "meta.json").exists():
            funnel(["data", "prepare", "movielens", "--input", str(ml100k), "--out", str(out["ml-100k"])])
    return out


def train(config: str, dataset: Path, run_dir: Path, nproc: int, overrides: list[str]) -> dict[str, Any]:
    """One run of `python -m trainer` under torchrun; returns its summary.json."""
    sets = [f"data.path={dataset}", f"run_dir={run_dir}", "trainer.enable_progress_bar=false",
            "logger.kind=none", "trainer.checkpoint_every_n_steps=null", *overrides]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer", "--config", str(REPO / "configs" / config)]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
        "WANDB_MODE": "disabled",
    }
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _pick(summary: dict[str, Any], names: list[str], prefix: str = "test/") -> dict[str, float]:
    return {n: round(summary["metrics"][f"{prefix}{n}"], 4) for n in names}


# -- ML-1M ---------------------------------------------------------------------------------------
def ml1m(
    dataset: Path, work: Path, epochs: int, ablation_epochs: int, multinomial_epochs: int, variants: list[str]
) -> dict[str, Any]:
    names = ["recall@20", "ndcg@20", "recall@10", "recall@50"]
    rows: dict[str, Any] = {}
    runs = {**ABLATION, MULTINOMIAL: (2, [])}
    for name, (nproc, overrides) in runs.items():
        if name not in variants:
            continue
        if name == SHORT and ablation_epochs == epochs:
            continue  # the headline run is the ablation's reference
        run_dir = work / "ml1m" / "".join(c if c.isalnum() else "_" for c in name)
        variant_epochs = {HEADLINE: epochs, MULTINOMIAL: multinomial_epochs}.get(name, ablation_epochs)
        config = "two_tower_ml1m_multinomial.yaml" if name == MULTINOMIAL else "two_tower_ml1m.yaml"
        s = train(config, dataset, run_dir, nproc, [f"trainer.max_epochs={variant_epochs}", *overrides])
        rows[name] = {
            **_pick(s, names),
            "popularity": _pick(s, ["recall@20", "ndcg@20"], "test/pop_"),
            "epochs": variant_epochs,
            "ranks": nproc,
            "samples_per_sec": s["samples_per_sec"],
            "fit_seconds": s["fit_seconds"],
            "checkpoint": s["checkpoint"],
        }
        r = rows[name]
        print(f"  ml-1m {name:<26} recall@20 {r['recall@20']:.4f}  ndcg@20 {r['ndcg@20']:.4f}  "
              f"({variant_epochs} epochs, {s['fit_seconds']:.0f} s, {s['samples_per_sec']:,.0f} samples/s)",
              flush=True)  # fmt: skip
    return rows


# -- ML-100K -------------------------------------------------------------------------------------
def evaluate_scores(
    dm: RetrievalDataModule, score: Any, ks: tuple[int, ...] = (10, 20, 50), stage: str = "test"
) -> dict[str, float]:
    """Full-ranking metrics of ``score(users) -> [U, items + 1]`` on ``stage`` (``val`` or ``test``)
    under the two-tower protocol: visible items and the padding column are excluded from the ranking."""
    ev = dm.eval_users(stage)
    if ev is None:
        raise ValueError(f"{dm.path}: the dataset has no {stage} users")
    width = dm.schema.num_items + 1
    acc = TopKAccumulator(metric_names(ks))
    for lo in range(0, len(ev.users), 1024):
        batch = dm.user_batch(stage, np.arange(lo, min(lo + 1024, len(ev.users))))
        seen = batch.seen_mask(width)
        seen[:, 0] = True
        scores = score(batch.user)
        acc.update(topk_metrics_from_scores(mask_scores(scores, seen), batch.target_mask(width), ks))
    return acc.compute()


def bpr_mf(dataset: Path, epochs: int, dim: int = 64, lr: float = 0.005, l2: float = 1e-5) -> dict[str, Any]:
    """Plain PyTorch matrix factorisation with the BPR loss and uniform negatives (Rendle et al., 2009)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation
    dm = RetrievalDataModule(dataset, history_length=0)
    train = np.flatnonzero(dm.codes == 0)
    users = torch.from_numpy(dm.inter_user[train])
    items = torch.from_numpy(dm.inter_item[train])
    user_emb = torch.nn.Embedding(dm.schema.num_users + 1, dim)
    item_emb = torch.nn.Embedding(dm.schema.num_items + 1, dim)
    for e in (user_emb, item_emb):
        torch.nn.init.normal_(e.weight, std=0.1)
    opt = torch.optim.Adam([*user_emb.parameters(), *item_emb.parameters()], lr=lr)
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for lo in range(0, len(order), 1024):
            idx = order[lo : lo + 1024]
            u, i = user_emb(users[idx]), item_emb(items[idx])
            j = item_emb(torch.randint(1, dm.schema.num_items + 1, (len(idx),), generator=g))
            loss = -torch.nn.functional.logsigmoid((u * (i - j)).sum(1)).mean()
            loss = loss + l2 * (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        table = item_emb.weight
        metrics = evaluate_scores(dm, lambda u: user_emb(u) @ table.T)
    return {**{k: round(v, 4) for k, v in metrics.items() if k != "mrr"}, "epochs": epochs,
            "train_seconds": round(seconds, 1)}  # fmt: skip


def ml100k(dataset: Path, work: Path, epochs: int, mf_epochs: int) -> dict[str, Any]:
    names = ["recall@10", "recall@20", "recall@50", "ndcg@10"]
    s = train("two_tower_ml100k.yaml", dataset, work / "ml100k", 2, [f"trainer.max_epochs={epochs}"])
    out = {
        "two_tower": {**_pick(s, names), "epochs": epochs, "fit_seconds": s["fit_seconds"]},
        "popularity": _pick(s, names, "test/pop_"),
        "bpr_mf": {k: v for k, v in bpr_mf(dataset, mf_epochs).items() if k.split("@")[0] != "hr"},
    }
    for name, r in out.items():
        print(f"  ml-100k {name:<11} " + "  ".join(f"{n} {r[n]:.4f}" for n in names), flush=True)
    return out


# -- indexes -------------------------------------------------------------------------------------
INDEXES = {
    "flat": IndexConfig(kind="flat"),
    "ivf_flat": IndexConfig(kind="ivf_flat"),
    "ivf_pq": IndexConfig(kind="ivf_pq", pq_m=8),
    "hnsw": IndexConfig(kind="hnsw"),
}


def index_table(items: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    rows = {}
    for name, cfg in INDEXES.items():
        started = time.perf_counter()
        index = build_index(items, cfg)
        build = time.perf_counter() - started
        q = evaluate_index(index, items, queries, k=100)
        rows[name] = {"build_seconds": round(build, 3), "recall@100": round(q["recall@100"], 4),
                      "qps": round(q["qps"]), "exact_qps": round(q["exact_qps"])}  # fmt: skip
        print(f"    {name:<9} build {build:7.2f} s  recall@100 {q['recall@100']:.4f}  {q['qps']:>10,.0f} q/s "
              f"(exact {q['exact_qps']:,.0f} q/s)", flush=True)  # fmt: skip
    return rows


def world_catalog(preset: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit item and user latent vectors of a synthetic world (category-clustered, 16-d)."""
    from data.synthetic import PRESETS, make_world

    world = make_world(PRESETS[preset])

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return unit(world.item_latent[1:]), unit(world.user_latent[1:2001])


def indexes(dataset: Path, checkpoint: str, work: Path, preset: str) -> dict[str, Any]:
    out_dir = work / "artifact-ml1m"
    started = time.perf_counter()
    config = REPO / "configs" / "two_tower_ml1m.yaml"
    funnel(["export", "retrieval", "--checkpoint", checkpoint, "--config", str(config),
            "--set", f"data.path={dataset}", "--out", str(out_dir), "--overwrite"])  # fmt: skip
    export_seconds = time.perf_counter() - started
    meta = json.loads((out_dir / "meta.json").read_text())
    items = np.load(out_dir / "item_embeddings.npy")
    encoder = torch.export.load(out_dir / "encoder.pt2").module()
    _, dm = build_two_tower(load_config(config, [f"data.path={dataset}"]))
    test_users = dm.eval_users("test")
    assert test_users is not None
    # the encoder's inputs as serving would build them (0-padded plain tensors)
    queries = encode_queries(encoder, dm, "test", np.arange(len(test_users.users)))
    print(
        f"  index: ML-1M items ({len(items):,} x {items.shape[1]}), {len(queries):,} user queries", flush=True
    )
    ml1m_rows = index_table(items, queries)
    big, big_queries = world_catalog(preset)
    print(f"  index: synthetic world {preset!r} item latents ({len(big):,} x {big.shape[1]}), "
          f"{len(big_queries):,} user latents as queries", flush=True)  # fmt: skip
    big_rows = index_table(big, big_queries)
    return {"export_seconds": round(export_seconds, 1), "export_ann": meta["ann"],
            "ml1m_items": ml1m_rows, f"synthetic_{preset}_items": big_rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ml1m-epochs", type=int, default=8, help="epochs of the headline ML-1M run")
    p.add_argument("--ablation-epochs", type=int, default=8, help="epochs of every other ML-1M variant")
    p.add_argument("--multinomial-epochs", type=int, default=60, help="epochs of the multinomial recipe")
    p.add_argument("--ml100k-epochs", type=int, default=5)
    p.add_argument("--mf-epochs", type=int, default=30)
    p.add_argument(
        "--catalog", default="medium", help="synthetic world preset whose item latents are indexed"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=VARIANTS,
        metavar="NAME",
        help=f"ML-1M variants to run (default all: {', '.join(VARIANTS)})",
    )
    p.add_argument("--ml1m-only", action="store_true", help="skip the FAISS indexes and ML-100K")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-two-tower"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "two_tower.json"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": vars(args),
        "published_ml1m": PUBLISHED_ML1M,
        "seconds": {},
    }
    data = prepare(work)
    if "ml-1m" in data:
        t = time.perf_counter()
        print("== ML-1M (LCF/UltraGCN split), full ranking ==", flush=True)
        epochs = (args.ml1m_epochs, args.ablation_epochs, args.multinomial_epochs)
        results["ml1m"] = ml1m(data["ml-1m"], work, *epochs, args.variants)
        results["seconds"]["ml1m"] = round(time.perf_counter() - t, 1)
        if HEADLINE in results["ml1m"] and not args.ml1m_only:
            t = time.perf_counter()
            print("== FAISS indexes ==", flush=True)
            checkpoint = results["ml1m"][HEADLINE]["checkpoint"]
            results["indexes"] = indexes(data["ml-1m"], checkpoint, work, args.catalog)
            results["seconds"]["indexes"] = round(time.perf_counter() - t, 1)
    else:
        print(f"skipping ML-1M and indexes: {SHARED / 'movielens-1m-ultragcn'} not found")
    if "ml-100k" in data and not args.ml1m_only:
        t = time.perf_counter()
        print("== ML-100K (leave-one-out), full ranking ==", flush=True)
        results["ml100k"] = ml100k(data["ml-100k"], work, args.ml100k_epochs, args.mf_epochs)
        results["seconds"]["ml100k"] = round(time.perf_counter() - t, 1)
    results["seconds"]["total"] = round(time.perf_counter() - started, 1)
    if results.get("ml1m"):
        print("\nML-1M test (full ranking)         Recall@20  NDCG@20")
        for name, r in PUBLISHED_ML1M.items():
            print(f"  {name + ' (published)':<32}{r['recall@20']:>9.4f}{r['ndcg@20']:>9.4f}")
        pop = next(iter(results["ml1m"].values()))["popularity"]
        print(f"  {'popularity':<32}{pop['recall@20']:>9.4f}{pop['ndcg@20']:>9.4f}")
        for name, r in results["ml1m"].items():
            label = f"two-tower {name}"
            print(f"  {label:<32}{r['recall@20']:>9.4f}{r['ndcg@20']:>9.4f}   ({r['epochs']} epochs)")
    print(f"\ntotal {results['seconds']['total']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
