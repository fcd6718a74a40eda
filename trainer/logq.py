"""Streaming estimate of item sampling probabilities for logQ correction (Yi et al., RecSys 2019).

In-batch negatives over-sample popular items; the softmax is corrected by subtracting ``log q`` of
each candidate. When item frequencies are not known up front (a stream, a catalog that changes),
Yi et al. (Algorithm 2) estimate them on the fly: for each item (or hash bucket) keep the step it
was last seen in (``A``) and a moving average of the number of steps between its occurrences
(``B``); the item then appears in a batch with probability about ``1 / B``.

Two deliberate departures from the paper. An item's first gap is the steps since the stream
started (the paper's ``B = 0`` start makes a new item look hugely popular for a while). And an
item seen ``c`` times in one step counts ``c`` occurrences: next to the moving average of the gaps
the estimator keeps one of the counts, and the rate is their ratio (occurrences per step, a
ratio of averages: averaging ``gap / c`` instead underestimates items seen a few times per step
by ~25%, since E[1/c] > 1/E[c]).

The state lives in buffers, so it is checkpointed with the module; every rank must feed it the same
ids (the global batch's), which keeps the ranks' estimates identical.
"""

from __future__ import annotations

import torch
from torch import nn

# Knuth's multiplicative hash constant: spreads consecutive ids over the buckets
_HASH_MULTIPLIER = 2654435761


class StreamingItemFrequency(nn.Module):
    """Per-example sampling probability of item ids, learned from the ids of training batches.

    ``num_buckets >= `` the largest id + 1 keeps one exact slot per item; fewer buckets hash ids
    (collisions merge items' counts, as in the paper).
    """

    def __init__(self, num_buckets: int, num_items: int, alpha: float = 0.01) -> None:
        super().__init__()
        if num_buckets < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"num_buckets {num_buckets} must be >= 1 and alpha {alpha} in (0, 1]")
        self.num_buckets = num_buckets
        self.exact = num_buckets > num_items
        self.alpha = alpha
        self.register_buffer("last_step", torch.zeros(num_buckets, dtype=torch.int64))
        self.register_buffer("gap", torch.zeros(num_buckets, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(num_buckets, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("rows_per_step", torch.zeros((), dtype=torch.float64))

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return ids.long()
        return (ids.long() * _HASH_MULTIPLIER) % self.num_buckets

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        """One training step's item ids (the whole global batch, identical on every rank)."""
        t = int(self.step) + 1
        buckets, counts = torch.unique(self.bucket(ids), return_counts=True)
        buckets = buckets.to(self.gap.device)
        counts = counts.to(self.gap.device, torch.float64)
        previous = self.last_step[buckets]
        steps = (t - previous).to(torch.float64)
        seen = previous > 0
        a = self.alpha
        self.gap[buckets] = torch.where(seen, (1 - a) * self.gap[buckets] + a * steps, steps)
        self.count[buckets] = torch.where(seen, (1 - a) * self.count[buckets] + a * counts, counts)
        self.last_step[buckets] = t
        self.step.fill_(t)
        # the per-example probability is per-step probability / rows per step (a running mean)
        rows = float(ids.numel())
        self.rows_per_step.mul_(t - 1).add_(rows).div_(t)

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated probability that one training example's item is ``ids`` (``[N]`` float64).

        Items never seen get the probability of one occurrence over the whole stream so far.
        """
        b = self.bucket(ids).to(self.gap.device)
        gap, count = self.gap[b], self.count[b]
        unseen = gap == 0
        gap = torch.where(unseen, self.step.clamp(min=1).to(torch.float64), gap)
        count = torch.where(unseen, torch.ones_like(count), count)
        return count / (gap * self.rows_per_step.clamp(min=1.0))
