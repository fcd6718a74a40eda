"""How far can a linear item-item model go on ML-1M (LCF split), at full rank and at a two-tower's rank?

Issue #4 asks the two-tower for UltraGCN's Recall@20 (0.2787). A two-tower whose user tower sums
the user's history items through a linear layer scores ``u . v_j = sum_{i in H} h_i . v_j``: a
rank-``d`` item-item model ``B = H V^T``. EASE (Steck, WWW 2019) is the best full-rank member of
that family, in closed form: ``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1``. This script
measures EASE over a grid of ``lambda`` and, for the validation-best ``lambda``, EASE's ``B``
truncated to rank ``d`` by SVD (the best rank-``d`` approximation of that ``B``), on the validation
carve the two-tower is tuned on (``model.val_fraction=0.1``, seed 0) and on test (trained on the
whole train file), with the two-tower's protocol (``two_tower.evaluate_scores``: full ranking,
training items excluded).

``--mult-dae`` adds a model beyond that family: Mult-DAE (Liang et al., WWW 2018), a two-tower in
all but name whose user tower is a nonlinear MLP over the L2-normalised history (input dropout, one
``tanh`` layer) and whose item tower is the output layer's rows and biases, trained with a full
softmax over the catalog (multinomial likelihood). Its weight decay is picked on the validation carve
(and the epoch, evaluated every 10), then it is trained on the whole train file for that many epochs
and evaluated once on test.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/item_item_ceiling.py [--mult-dae [--threads 2]] [--out
FILE]`` (about a minute on one core; ~12 more with ``--mult-dae`` on two); prints a table and writes
JSON (default benchmarks/results/item_item_ceiling.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from two_tower import evaluate_scores, prepare  # noqa: E402

from data.retrieval import RetrievalDataModule  # noqa: E402
from data.shards import SPLIT_CODES  # noqa: E402

LAMBDAS = (100.0, 200.0, 500.0, 1000.0, 2000.0)
RANKS = (32, 64, 128, 256, 512)
KS = (10, 20, 50)


def training_matrix(dm: RetrievalDataModule) -> np.ndarray:
    """The ``[users + 1, items + 1]`` 0/1 matrix of the training interactions (row/column 0: padding)."""
    train = np.flatnonzero(dm.codes == SPLIT_CODES["train"])
    x = np.zeros((dm.schema.num_users + 1, dm.schema.num_items + 1), dtype=np.float64)
    x[dm.inter_user[train], dm.inter_item[train]] = 1.0
    return x


def ease(x: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def metrics(dm: RetrievalDataModule, x: np.ndarray, b: np.ndarray, stage: str) -> dict[str, float]:
    def score(users: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy((x[users.numpy()] @ b).astype(np.float32))

    return _rounded(evaluate_scores(dm, score, KS, stage=stage))


def _rounded(out: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in out.items() if k != "users"}


DAE_WEIGHT_DECAYS = (0.0001, 0.001, 0.01)


def mult_dae(
    dm: RetrievalDataModule,
    x: np.ndarray,
    stage: str,
    epochs: int,
    weight_decay: float,
    hidden: int = 600,
    dropout: float = 0.5,
    eval_every: int = 10,
) -> list[dict[str, float]]:
    """Train Mult-DAE on the training rows of ``x`` (Adam 1e-3, 500 users a batch, L2 ``weight_decay / 2``
    on the weight matrices); ``stage`` metrics every ``eval_every`` epochs and at the last."""
    torch.manual_seed(0)
    rows = torch.from_numpy(x.astype(np.float32))
    encoder, decoder = torch.nn.Linear(rows.shape[1], hidden), torch.nn.Linear(hidden, rows.shape[1])
    for layer in (encoder, decoder):
        torch.nn.init.xavier_uniform_(layer.weight)
        torch.nn.init.normal_(layer.bias, std=0.001)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)

    def logits(batch: torch.Tensor, train: bool) -> torch.Tensor:
        h = torch.nn.functional.normalize(batch, dim=1)
        if train:
            h = torch.nn.functional.dropout(h, dropout)
        return decoder(torch.tanh(encoder(h)))

    users = torch.arange(1, rows.shape[0])  # row 0 is padding
    history = []
    for epoch in range(1, epochs + 1):
        order = users[torch.randperm(len(users))]
        for lo in range(0, len(order), 500):
            batch = rows[order[lo : lo + 500]]
            nll = -(torch.log_softmax(logits(batch, True), dim=1) * batch).sum(1).mean()
            l2 = weight_decay / 2 * (encoder.weight.square().sum() + decoder.weight.square().sum())
            optimizer.zero_grad()
            (nll + l2).backward()
            optimizer.step()
        if epoch % eval_every == 0 or epoch == epochs:
            with torch.no_grad():
                out = evaluate_scores(dm, lambda u: logits(rows[u], False), KS, stage=stage)
            history.append({"epoch": epoch, **_rounded(out)})
            print(stage, f"mult-dae weight_decay={weight_decay:g}", history[-1], flush=True)
    return history


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-two-tower")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "item_item_ceiling.json")
    p.add_argument("--mult-dae", action="store_true", help="also train Mult-DAE (a nonlinear user tower)")
    p.add_argument("--dae-epochs", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads (Mult-DAE's matrix products)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = prepare(args.work_dir).get("ml-1m")
    if data is None:
        print("../shared/data/movielens-1m-ultragcn not found: nothing to measure", file=sys.stderr)
        return 1
    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "item_item_ceiling", "dataset": str(data), "stages": {}}
    best_lam = None
    dae_choice: dict[str, Any] = {}
    for stage in ("val", "test"):
        dm = RetrievalDataModule(data, history_length=0, seed=0, val_fraction=0.1 if stage == "val" else 0.0)
        x = training_matrix(dm)
        lams = LAMBDAS if stage == "val" else (best_lam,)
        rows: dict[str, Any] = {}
        for lam in lams:
            assert lam is not None
            rows[f"ease lambda={lam:g}"] = metrics(dm, x, ease(x, lam), stage)
            print(stage, f"ease lambda={lam:g}", rows[f"ease lambda={lam:g}"], flush=True)
        if stage == "val":
            best_lam = max(LAMBDAS, key=lambda lam: rows[f"ease lambda={lam:g}"]["recall@20"])
        assert best_lam is not None
        u, s, vt = np.linalg.svd(ease(x, best_lam))
        for d in RANKS:
            name = f"ease lambda={best_lam:g} rank {d}"
            rows[name] = metrics(dm, x, (u[:, :d] * s[:d]) @ vt[:d], stage)
            print(stage, name, rows[name], flush=True)
        if args.mult_dae:
            if stage == "val":
                runs = {wd: mult_dae(dm, x, stage, args.dae_epochs, wd) for wd in DAE_WEIGHT_DECAYS}
                evaluated = [(wd, h) for wd, hist in runs.items() for h in hist]
                best = max(evaluated, key=lambda r: r[1]["recall@20"])
                dae_choice = {"weight_decay": best[0], "epochs": best[1]["epoch"]}
                results["mult_dae_val_runs"] = {f"{wd:g}": hist for wd, hist in runs.items()}
                results["mult_dae_choice"] = dae_choice
                rows["mult-dae (validation-best)"] = best[1]
            else:
                final = mult_dae(dm, x, stage, dae_choice["epochs"], dae_choice["weight_decay"],
                                 eval_every=dae_choice["epochs"])  # fmt: skip
                rows["mult-dae (validation-best)"] = final[-1]
        results["stages"][stage] = rows
    results["best_lambda_on_val"] = best_lam
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
