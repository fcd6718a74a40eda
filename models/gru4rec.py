"""GRU4Rec (Hidasi et al., ICLR 2016; Hidasi & Karatzoglou, CIKM 2018) on the shared item table.

The same item table, lookups, batches and losses as SASRec (:mod:`models.sasrec`); only the
encoder differs: dropout on the history embeddings, a multi-layer GRU, dropout, and a linear map
back to ``embedding_dim`` when the GRU is wider, so scores stay inner products with the tied item
embeddings.

Left padding and a recurrent net: running the GRU over the padding first would change its state
before the first real item, so each row is rotated to be right-padded (real items first), run
through the GRU from a zero state, and rotated back. The GRU is causal, so the real positions'
outputs cannot see the padding that now follows them, and the result does not depend on how much
padding a batch carries. (A rotation rather than ``pack_padded_sequence`` keeps the cuDNN path and
``torch.export``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.sasrec import SequentialRecommender


@dataclass
class GRU4RecConfig:
    num_items: int  # embedding rows, padding row 0 included
    embedding_dim: int = 64
    hidden_dim: int | None = None  # None: embedding_dim
    num_layers: int = 1
    max_len: int = 50  # history items kept (the most recent)
    dropout: float = 0.25
    init_scale: float | None = None  # item table init U(-s, s); None: sqrt(1 / num_items)

    def __post_init__(self) -> None:
        for name in ("num_items", "embedding_dim", "num_layers", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise ValueError(f"model.hidden_dim must be > 0, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def rotate_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = x[b, (j + shift[b]) % L]`` for ``x [B, L, ...]``."""
    length = x.shape[1]
    index = (torch.arange(length, device=x.device)[None, :] + shift[:, None]) % length
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class GRU4RecEncoder(nn.Module):
    def __init__(self, config: GRU4RecConfig, device: torch.device | None = None) -> None:
        super().__init__()
        c = config
        hidden = c.hidden_dim or c.embedding_dim
        self.dropout = nn.Dropout(c.dropout)
        self.gru = nn.GRU(
            c.embedding_dim,
            hidden,
            num_layers=c.num_layers,
            batch_first=True,
            dropout=c.dropout if c.num_layers > 1 else 0.0,
            device=device,
        )
        self.proj: nn.Module = (
            nn.Linear(hidden, c.embedding_dim, device=device) if hidden != c.embedding_dim else nn.Identity()
        )

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = history.shape[1]
        pad = length - mask.sum(dim=1)  # left padding of each row
        right_padded = rotate_rows(self.dropout(history), pad)
        out, _ = self.gru(right_padded)
        out = rotate_rows(out, (length - pad) % length)
        return self.proj(self.dropout(out)) * mask.unsqueeze(-1).to(out.dtype)


class GRU4Rec(SequentialRecommender):
    def __init__(self, config: GRU4RecConfig, device: torch.device | None = None) -> None:
        super().__init__(
            config.num_items, config.embedding_dim, GRU4RecEncoder(config, device), config.init_scale, device
        )
        self.config = config
