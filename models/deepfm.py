"""DLRM-style DeepFM (Guo et al., IJCAI 2017) on a TorchRec ``EmbeddingBagCollection``.

Fields are the sparse features (one pooled embedding each) plus the dense features projected into
the embedding space as one more field. The logit is

    bias + first-order(sparse) + linear(dense) + FM second order over all fields + deep MLP(all fields)

First-order weights live in the same tables as the factors: every table has ``embedding_dim + 4``
columns, the first ``embedding_dim`` are the FM factor and the sum of the last 4 is the feature's
first-order weight. One lookup then serves both terms and the planner shards them together; the
4 extra columns (rather than 1) keep the width a multiple of 4, which FBGEMM's CUDA kernels need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

FIRST_ORDER_COLUMNS = 4


@dataclass
class DeepFMConfig:
    sparse_features: dict[str, int]  # feature name -> vocabulary size (embedding rows)
    num_dense: int
    embedding_dim: int = 16
    dense_arch: list[int] = field(default_factory=lambda: [64])
    deep_arch: list[int] = field(default_factory=lambda: [256, 128, 64])
    dropout: float = 0.0
    # table name -> features sharing it (its rows = the largest vocabulary among them);
    # features not listed get a table of their own named after the feature.
    shared_tables: dict[str, list[str]] = field(default_factory=dict)
    multi_valued_pooling: str = "mean"
    multi_valued: list[str] = field(default_factory=list)

    def mean_pooled(self) -> list[str]:
        """Multi-valued features whose bags are averaged (summed by the kernel, divided in forward)."""
        return [f for f in self.multi_valued if self.multi_valued_pooling == "mean"]

    def tables(self) -> list[EmbeddingBagConfig]:
        if self.embedding_dim % 4:
            raise ValueError(f"embedding_dim {self.embedding_dim} must be a multiple of 4 (FBGEMM kernels)")
        shared = {f: t for t, feats in self.shared_tables.items() for f in feats}
        unknown = sorted(set(shared) - set(self.sparse_features))
        if unknown:
            raise ValueError(
                f"shared_tables names unknown feature(s) {unknown}; known: {sorted(self.sparse_features)}"
            )
        groups: dict[str, list[str]] = {}
        for name in self.sparse_features:
            groups.setdefault(shared.get(name, name), []).append(name)
        return [
            EmbeddingBagConfig(
                name=table,
                embedding_dim=self.embedding_dim + FIRST_ORDER_COLUMNS,
                num_embeddings=max(self.sparse_features[f] for f in feats),
                feature_names=feats,
                # SUM in the kernel, mean taken in forward(): TorchRec (1.9, gloo) divides other MEAN
                # tables by the bag length a second time when one MEAN table is row-wise sharded.
                pooling=PoolingType.SUM,
            )
            for table, feats in groups.items()
        ]


def fm_second_order(fields: torch.Tensor) -> torch.Tensor:
    """Sum over field pairs of <v_i, v_j> for ``fields [B, F, D]``, by the sum-square trick -> ``[B]``.

    (TorchRec's ``FactorizationMachine`` flattens all fields into one vector before the trick, which
    also multiplies different dimensions with each other; this is the FM of Rendle, 2010.)
    """
    square_of_sum = fields.sum(dim=1).pow(2)
    sum_of_square = fields.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


def mlp(sizes: list[int], dropout: float = 0.0, device: torch.device | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b, device=device))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DeepFMHead(nn.Module):
    """Everything after the table lookup: ``(pooled rows per feature, dense) -> logits [B]``.

    Its own module so that an exported scorer (``trainer/export_ranking.py``), which looks rows up
    without TorchRec, runs exactly this code on the same weights.
    """

    def __init__(self, config: DeepFMConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d = self.embedding_dim = config.embedding_dim
        self.has_dense = config.num_dense > 0
        num_fields = len(config.sparse_features) + int(self.has_dense)
        if self.has_dense:
            self.dense_arch = mlp([config.num_dense, *config.dense_arch, d], config.dropout, device)
            self.dense_linear = nn.Linear(config.num_dense, 1, bias=False, device=device)
        self.deep = mlp([num_fields * d, *config.deep_arch, 1], config.dropout, device)
        self.bias = nn.Parameter(torch.zeros(1, device=device))

    def forward(self, per_feature: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """``per_feature``: each sparse feature's pooled ``[B, d + 4]`` row, in the model's order."""
        d = self.embedding_dim
        fields = [e[:, :d] for e in per_feature]
        first_order = torch.stack([e[:, d:].sum(dim=1) for e in per_feature], dim=1).sum(dim=1)
        logit = self.bias + first_order
        if self.has_dense:
            fields.insert(0, self.dense_arch(dense))
            logit = logit + self.dense_linear(dense).squeeze(1)
        logit = logit + fm_second_order(torch.stack(fields, dim=1))
        return logit + self.deep(torch.cat(fields, dim=1)).squeeze(1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the parameters this module owns directly (DMP materialises meta modules one by one)."""
        self.bias.zero_()


class DeepFM(nn.Module):
    """Scores ``(dense [B, num_dense], sparse KJT)`` -> logits ``[B]``."""

    def __init__(self, config: DeepFMConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.feature_names = list(config.sparse_features)
        self.mean_pooled = config.mean_pooled()
        self.sparse_arch = EmbeddingBagCollection(tables=config.tables(), device=device)
        self.head = DeepFMHead(config, device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        # written to be FX-traceable (no item assignment on traced values): TorchRec's train
        # pipeline traces forward to find the sharded module's input
        pooled = self.sparse_arch(sparse)
        per_feature = []  # each [B, d + 4]
        for name in self.feature_names:
            emb = pooled[name]
            if name in self.mean_pooled:
                emb = emb / sparse[name].lengths().clamp(min=1).unsqueeze(1).to(emb.dtype)
            per_feature.append(emb)
        return self.head(per_feature, dense)
