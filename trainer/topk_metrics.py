"""Top-K retrieval metrics (Recall/HR/NDCG/MRR), exact across ranks.

Each rank scores its own users against the full catalog (or a sampled candidate set), turns the
scores into per-user metric values, and adds them into sums; :meth:`TopKAccumulator.compute`
all-reduces the sums, so the result is the mean over every user of every rank.

Conventions (the ones RecBole, LightGCN and the SASRec paper use):
- Recall@K = |top-K ∩ targets| / |targets|; HR@K = 1 if any target is in the top K;
- NDCG@K = DCG of the top K over the ideal DCG with min(|targets|, K) hits; for one target it is
  1 / log2(rank + 2) when rank < K (rank 0-based);
- MRR = 1 / (rank + 1) of the best-ranked target (not cut at K).
Items masked out (seen in training, padding) get -inf before ranking.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

METRICS = ("recall", "hr", "ndcg")


def mask_scores(scores: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """``scores [B, N]`` with ``exclude`` (bool ``[B, N]``) set to -inf."""
    if exclude is None:
        return scores
    return scores.masked_fill(exclude, float("-inf"))


def topk_metrics_from_scores(
    scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Per-user metrics for ``scores [B, N]`` and multi-hot ``targets [B, N]`` (bool).

    Returns ``{"recall@K": [B], "hr@K": [B], "ndcg@K": [B], "mrr": [B]}``; users without targets
    get NaN (callers drop them).
    """
    targets = targets.bool()
    n_targets = targets.sum(dim=1).float()
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices  # [B, kmax]
    hits = targets.gather(1, top).float()  # [B, kmax]
    discounts = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=scores.device, dtype=torch.float32))
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        k_eff = min(k, kmax)
        h = hits[:, :k_eff]
        out[f"recall@{k}"] = h.sum(1) / n_targets
        out[f"hr@{k}"] = (h.sum(1) > 0).float()
        ideal = torch.cumsum(discounts[:k_eff], 0)
        ideal_hits = torch.clamp(n_targets, max=k_eff).long().clamp(min=1) - 1
        out[f"ndcg@{k}"] = (h * discounts[:k_eff]).sum(1) / ideal[ideal_hits]
    # best target's rank: how many items score strictly higher than the best-scoring target
    best_target = scores.masked_fill(~targets, float("-inf")).max(dim=1).values
    rank = (scores > best_target.unsqueeze(1)).sum(dim=1).float()
    out["mrr"] = 1.0 / (rank + 1.0)
    empty = n_targets == 0
    for v in out.values():
        v[empty] = float("nan")
    return out


def single_target_metrics(
    target_scores: torch.Tensor, candidate_scores: torch.Tensor, ks: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Metrics when each user has one target scored against candidates (the sampled protocol).

    ``target_scores [B]``, ``candidate_scores [B, C]`` (the negatives, e.g. 100 sampled items).
    Ties count against the target (pessimistic), so a constant model cannot score well.
    """
    rank = (candidate_scores >= target_scores.unsqueeze(1)).sum(dim=1).float()
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = (rank < k).float()
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(rank + 2.0)
    out["mrr"] = 1.0 / (rank + 1.0)
    return out


def metric_names(ks: tuple[int, ...], kinds: tuple[str, ...] = METRICS) -> list[str]:
    return [f"{kind}@{k}" for kind in kinds for k in ks] + ["mrr"]


class TopKAccumulator:
    """Sums per-user metric values across batches and ranks.

    ``names`` is fixed up front so every rank all-reduces the same vector, even a rank that saw no
    users.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = sorted(names)
        self.sums: dict[str, float] = dict.fromkeys(self.names, 0.0)
        self.count = 0

    def update(self, per_user: dict[str, torch.Tensor]) -> None:
        valid = None
        for values in per_user.values():
            keep = ~torch.isnan(values)
            valid = keep if valid is None else valid & keep
        if valid is None:
            return
        for name in self.names:
            self.sums[name] += float(per_user[name][valid].double().sum())
        self.count += int(valid.sum())

    def compute(self, device: torch.device | None = None) -> dict[str, float]:
        names = self.names
        vec = torch.tensor(
            [self.sums[n] for n in names] + [float(self.count)],
            dtype=torch.float64,
            device=device or torch.device("cpu"),
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        total = vec[-1].item()
        result = {n: (vec[i].item() / total if total else float("nan")) for i, n in enumerate(names)}
        result["users"] = total
        return result

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.names, 0.0)
        self.count = 0
