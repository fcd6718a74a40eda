"""Ranking metrics that are exact across ranks: every rank's predictions are gathered, then scored.

AUC, log loss and normalized entropy (log loss divided by the entropy of the base rate, as in
He et al., ADKDD 2014, and TorchRec's NE) are computed on the concatenation of all ranks' outputs,
so the numbers do not depend on how rows were split across ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import Metric


def binary_auc(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Exact ROC AUC with ties counted as half (Mann-Whitney U); nan if one class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) > 0.5
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def normalized_entropy(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    y = np.asarray(labels, dtype=np.float64)
    base = float(np.clip(y.mean(), 1e-7, 1 - 1e-7))
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    return log_loss(probs, labels) / entropy


class BinaryCTRMetrics(Metric):
    """AUC, log loss and NE of click predictions, synchronised by gathering all ranks' rows."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        # kept on the compute device: NCCL gathers only device tensors
        self.logits.append(logits.detach().float().flatten())
        self.labels.append(labels.detach().float().flatten())

    def compute(self) -> dict[str, torch.Tensor]:
        logits = _cat(self.logits).cpu()
        labels = _cat(self.labels).cpu()
        probs = torch.sigmoid(logits).numpy()
        y = labels.numpy()
        return {
            "auc": torch.tensor(binary_auc(probs, y)),
            "logloss": torch.tensor(log_loss(probs, y)),
            "ne": torch.tensor(normalized_entropy(probs, y)),
            "rows": torch.tensor(float(len(y))),
        }


def _cat(x: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.cat(x) if x else torch.zeros(0)
