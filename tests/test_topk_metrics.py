"""Top-K metrics against brute-force definitions on small random cases."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.topk_metrics import (
    TopKAccumulator,
    metric_names,
    single_target_metrics,
    topk_metrics_from_scores,
)


def brute(scores: list[float], targets: set[int], k: int) -> dict[str, float]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    top = order[:k]
    hits = [1.0 if i in targets else 0.0 for i in top]
    dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(targets), k)))
    best = min(order.index(t) for t in targets)
    return {
        "recall": sum(hits) / len(targets),
        "hr": float(sum(hits) > 0),
        "ndcg": dcg / idcg,
        "mrr": 1 / (best + 1),
    }


def test_full_ranking_metrics_match_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 30, generator=g)
    targets = torch.rand(7, 30, generator=g) < 0.15
    targets[0] = False
    targets[0, 3] = True
    out = topk_metrics_from_scores(scores, targets, (5, 10))
    for u in range(7):
        t = set(torch.nonzero(targets[u]).flatten().tolist())
        if not t:
            assert math.isnan(out["recall@5"][u])
            continue
        for k in (5, 10):
            ref = brute(scores[u].tolist(), t, k)
            for name in ("recall", "hr", "ndcg"):
                assert out[f"{name}@{k}"][u].item() == pytest.approx(ref[name], abs=1e-6)
        assert out["mrr"][u].item() == pytest.approx(ref["mrr"], abs=1e-6)


def test_sampled_protocol_and_accumulator() -> None:
    target = torch.tensor([0.9, 0.1, 0.5])
    cands = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [0.5, 0.2, 0.1]])
    out = single_target_metrics(target, cands, (1, 2))
    # ranks: 0, 3, 1 (a tie counts against the target)
    assert out["hr@1"].tolist() == [1.0, 0.0, 0.0]
    assert out["hr@2"].tolist() == [1.0, 0.0, 1.0]
    assert out["ndcg@2"][2].item() == pytest.approx(1 / math.log2(3))
    acc = TopKAccumulator(metric_names((1, 2), ("hr", "ndcg")))
    acc.update(out)
    res = acc.compute()
    assert res["users"] == 3 and res["hr@2"] == pytest.approx(2 / 3)
