"""The streaming item-frequency estimator behind logQ correction without known frequencies."""

from __future__ import annotations

import pytest
import torch

from trainer.logq import StreamingItemFrequency


def zipf(n: int, exponent: float = 1.1) -> torch.Tensor:
    p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** exponent
    return p / p.sum()


def stream(est: StreamingItemFrequency, p: torch.Tensor, steps: int, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        est.update(torch.multinomial(p, batch, replacement=True, generator=g) + 1)  # ids from 1


def test_hand_computed_updates() -> None:
    est = StreamingItemFrequency(num_buckets=10, num_items=5, alpha=0.5)
    est.update(torch.tensor([1, 1, 2, 3]))  # step 1: item 1 twice
    est.update(torch.tensor([1, 3, 3, 4]))  # step 2
    # item 1: first gap 1 (steps since start), count 2; then gap 0.5*1 + 0.5*1, count 0.5*2 + 0.5*1
    assert est.gap[1].item() == 1.0 and est.count[1].item() == 1.5
    assert est.gap[2].item() == 1.0 and est.count[2].item() == 1.0  # not seen again
    assert est.gap[3].item() == 1.0 and est.count[3].item() == 1.5
    assert est.gap[4].item() == 2.0 and est.count[4].item() == 1.0  # first seen at step 2
    probs = est.probability(torch.tensor([1, 4, 5]))
    # 4 rows per step; item 5 unseen: one occurrence over the 2 steps so far
    assert probs.tolist() == pytest.approx([1.5 / 4, 1.0 / (2 * 4), 1.0 / (2 * 4)])


def test_estimates_converge_to_true_frequencies() -> None:
    n = 500
    p = zipf(n)
    est = StreamingItemFrequency(num_buckets=n + 1, num_items=n, alpha=0.01)
    stream(est, p, steps=3000, batch=256, seed=0)
    ratio = est.probability(torch.arange(1, n + 1)) / p
    # from ~49 occurrences per batch (the head) to one every ~20 batches (the tail)
    assert (ratio[:100] - 1).abs().max() < 0.25
    assert (ratio - 1).abs().median() < 0.1


def test_hashed_buckets_keep_the_head_right() -> None:
    n = 500
    p = zipf(n)
    est = StreamingItemFrequency(num_buckets=97, num_items=n, alpha=0.01)
    assert not est.exact
    stream(est, p, steps=2000, batch=256, seed=1)
    ratio = est.probability(torch.arange(1, 11)) / p[:10]
    assert (ratio - 1).abs().max() < 0.25  # collisions only add tail mass to the head's buckets


def test_state_is_checkpointed_with_the_module() -> None:
    p = zipf(50)
    est = StreamingItemFrequency(num_buckets=51, num_items=50)
    stream(est, p, steps=50, batch=32, seed=2)
    restored = StreamingItemFrequency(num_buckets=51, num_items=50)
    restored.load_state_dict(est.state_dict())
    ids = torch.arange(1, 51)
    assert torch.equal(restored.probability(ids), est.probability(ids))


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="alpha"):
        StreamingItemFrequency(num_buckets=10, num_items=5, alpha=0.0)
