"""Two-tower retrieval model (Yi et al., RecSys 2019) on one TorchRec ``EmbeddingBagCollection``.

    user tower: [user id, user side features, mean of the history items]      -> MLP -> L2 norm
    item tower: [item id, item side features (multi-valued ones mean-pooled)] -> MLP -> L2 norm
    score(u, i) = <user, item> / temperature   (trainer.retrieval's losses apply the temperature)

With ``projection=False`` there is no dense layer: each tower's output is its pooled embeddings, so
the towers are the (sharded) tables alone. Several user-tower features are then concatenated, or,
with ``user_blend``, blended: ``sum_f w_f * normalise(e_f)`` (SimpleX's gamma blend of the user-id
row and the history, with fixed weights), which keeps the tower the width of one table.

The user tower may drop the id and side features and keep only the history bag (an inductive
model, YouTube-DNN style: a user unseen in training is embedded from the items they consumed).

Both towers read one ``EmbeddingBagCollection``, so a single sharding plan (and one
``DistributedModelParallel``) covers every table, and the history bag can read the item-id table
itself (``share_item_table``): an item seen in a history and the same item as a candidate then
share one embedding row.

A batch is one ``KeyedJaggedTensor`` holding every feature of both towers. Its first
``num_queries`` rows are queries and its last ``num_items`` rows are candidate items (they may
overlap: a training row carries a user and that user's positive item); features that do not
belong to a row are empty bags, which pool to zero. Index 0 of every feature means unknown or
padding and is never sent as a value, so an unknown id contributes nothing; the exported
:class:`QueryEncoder` keeps that rule, which is why it can take 0-padded plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.deepfm import mlp


@dataclass
class TwoTowerConfig:
    user_features: dict[str, int]  # user-tower feature -> vocabulary (embedding rows, OOV row included)
    item_features: dict[str, int]  # item-tower feature -> vocabulary; must include ``item_feature``
    item_feature: str = "item"  # the item-id feature (its table is the one the history may share)
    multi_valued: list[str] = field(default_factory=list)  # bag features (mean-pooled)
    history_length: int = 20  # most recent items in the history bag; 0 = no history feature
    share_item_table: bool = True  # history reads the item-id table instead of a table of its own
    embedding_dim: int = 64
    user_arch: list[int] = field(default_factory=lambda: [128])  # hidden layer sizes
    item_arch: list[int] = field(default_factory=lambda: [128])
    output_dim: int = 64
    # False: no dense layers, each tower's output is its pooled embeddings (concatenated), so the
    # score is a dot product of table rows (Mult-DAE's form: measured better than a linear projection
    # on the multinomial loss); output_dim must then equal that width
    projection: bool = True
    # projection False only: the user vector is sum_f w_f * normalise(e_f) over the user-tower features
    # (the history bag included; a feature not named weighs 1) instead of their concatenation. A
    # missing feature (unknown user id, empty bag) adds nothing. Empty: concatenate.
    user_blend: dict[str, float] = field(default_factory=dict)
    temperature: float = 0.05
    dropout: float = 0.0
    history_feature: str = "history"  # KJT key of the recent-items bag

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(
                f"model.embedding_dim {self.embedding_dim} must be a positive multiple of 4 (FBGEMM kernels)"
            )
        if self.output_dim <= 0:
            raise ValueError(f"model.output_dim must be > 0, got {self.output_dim}")
        if self.user_blend:
            unknown = sorted(set(self.user_blend) - set(self.query_features))
            if self.projection or unknown or min(self.user_blend.values()) < 0:
                raise ValueError(
                    f"model.user_blend {self.user_blend}: weights >= 0 of user-tower features "
                    f"{self.query_features}, with projection false (a projection learns its own blend)"
                )
        if not self.projection:
            widths = {
                "user": (1 if self.user_blend else len(self.query_features)) * self.embedding_dim,
                "item": len(self.candidate_features) * self.embedding_dim,
            }
            if self.user_arch or self.item_arch or set(widths.values()) != {self.output_dim}:
                raise ValueError(
                    f"model.projection false: the towers output their pooled embeddings, so user_arch and "
                    f"item_arch must be [] and output_dim {self.output_dim} must equal both towers' widths "
                    f"{widths} (features x embedding_dim)"
                )
        if not self.temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}")
        if self.history_length < 0:
            raise ValueError(f"model.history_length must be >= 0, got {self.history_length}")
        if not self.user_features and not self.history_length:
            raise ValueError("the user tower has no input: give model.user_features or a history_length")
        if self.item_feature not in self.item_features:
            raise ValueError(
                f"model.item_features {sorted(self.item_features)} must include the item id "
                f"feature {self.item_feature!r}"
            )
        both = sorted(set(self.user_features) & set(self.item_features))
        if both:
            raise ValueError(f"feature(s) {both} are in both towers; a feature belongs to one tower")
        h = self.history_feature
        if h in self.user_features or h in self.item_features:
            raise ValueError(f"{h!r} is the recent-items bag's key and cannot also name a feature")
        unknown = sorted(set(self.multi_valued) - set(self.user_features) - set(self.item_features))
        if unknown:
            raise ValueError(f"model.multi_valued names unknown feature(s) {unknown}")

    @property
    def query_features(self) -> list[str]:
        """User-tower inputs, in the order their embeddings are concatenated."""
        return [*self.user_features, *([self.history_feature] if self.history_length else [])]

    @property
    def candidate_features(self) -> list[str]:
        return list(self.item_features)

    @property
    def feature_names(self) -> list[str]:
        """Every KJT key, in the EBC's order (build batches with exactly these keys)."""
        return [f for t in self.tables() for f in t.feature_names]

    def table_of(self, feature: str) -> str:
        if feature == self.history_feature and self.share_item_table:
            return self.item_feature
        return feature

    def tables(self) -> list[EmbeddingBagConfig]:
        vocab = {**self.user_features, **self.item_features}
        features = [*self.user_features, *self.item_features]
        if self.history_length:
            vocab[self.history_feature] = self.item_features[self.item_feature]
            features.append(self.history_feature)
        groups: dict[str, list[str]] = {}
        for f in features:
            groups.setdefault(self.table_of(f), []).append(f)
        # Every table pools by SUM and the model divides bags by their lengths (:attr:`bag_features`):
        # TorchRec 1.9's sharded EBC divides a MEAN-pooled table's output by the bag length a second
        # time when another MEAN table of the same collection is sharded row-wise, so the mean is
        # taken here, where it is the same under every sharding plan.
        return [
            EmbeddingBagConfig(
                name=table,
                embedding_dim=self.embedding_dim,
                num_embeddings=max(vocab[f] for f in feats),
                feature_names=feats,
                pooling=PoolingType.SUM,
            )
            for table, feats in groups.items()
        ]

    @property
    def bag_features(self) -> list[str]:
        """Features averaged over their bag (multi-valued ones and the history)."""
        bags = [f for f in self.feature_names if f in self.multi_valued]
        return bags + ([self.history_feature] if self.history_length else [])


class NormalisedBlend(nn.Module):
    """``[B, F * width]`` concatenated feature embeddings -> ``sum_f weights[f] * normalise(part f)``.

    The weights are constants, not a buffer: the model is built on the meta device and DMP would
    leave a buffer of a module without parameters uninitialised.
    """

    def __init__(self, weights: list[float], width: int) -> None:
        super().__init__()
        self.weights = list(weights)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.width)
        for i, w in enumerate(self.weights):
            out = out + w * F.normalize(x[:, i * self.width : (i + 1) * self.width], dim=-1)  # 0 stays 0
        return out


class TwoTower(nn.Module):
    """``(features KJT, num_queries, num_items)`` -> (user embeddings, item embeddings), L2-normalised."""

    def __init__(self, config: TwoTowerConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.sparse_arch = EmbeddingBagCollection(tables=config.tables(), device=device)
        self.user_tower: nn.Module = nn.Identity()
        self.item_tower: nn.Module = nn.Identity()
        if config.projection:
            self.user_tower = mlp(
                [len(config.query_features) * d, *config.user_arch, config.output_dim], config.dropout, device
            )
            self.item_tower = mlp(
                [len(config.candidate_features) * d, *config.item_arch, config.output_dim],
                config.dropout,
                device,
            )
        elif config.user_blend:
            weights = [config.user_blend.get(f, 1.0) for f in config.query_features]
            self.user_tower = NormalisedBlend(weights, d)

    def forward(
        self, features: KeyedJaggedTensor, num_queries: int, num_items: int, with_user_norms: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """User embeddings of the first ``num_queries`` rows, item embeddings of the last ``num_items``.

        ``with_user_norms`` adds a third output, ``[num_queries]`` squared L2 norms of each query's
        user-feature embeddings (summed over the features): what an embedding regulariser of the
        user-id rows penalises (SimpleX), which the normalised outputs cannot show.
        """
        # FX-traceable (TorchRec's train pipeline traces it to find the sharded module's input): no
        # dict of the pooled KeyedTensor, no key lookups on the KJT's key list
        cfg = self.config
        pooled = self.sparse_arch(features)
        bags = set(cfg.bag_features)
        embedding: dict[str, torch.Tensor] = {}
        for f in dict.fromkeys([*cfg.query_features, *cfg.candidate_features]):
            x = pooled[f]
            if f in bags:
                x = x / features[f].lengths().clamp(min=1).unsqueeze(1).to(x.dtype)
            embedding[f] = x
        rows = embedding[cfg.item_feature].shape[0]
        user_input = torch.cat([embedding[f][:num_queries] for f in cfg.query_features], 1)
        user = F.normalize(self.user_tower(user_input), dim=-1)
        item_input = torch.cat([embedding[f][rows - num_items :] for f in cfg.candidate_features], 1)
        item = F.normalize(self.item_tower(item_input), dim=-1)
        if not with_user_norms:
            return user, item
        norms = user.new_zeros(num_queries)
        for f in cfg.user_features:
            norms = norms + embedding[f][:num_queries].pow(2).sum(1)
        return user, item, norms


class QueryEncoder(nn.Module):
    """The user tower on plain tensors, for ``torch.export`` and serving without TorchRec.

    Inputs: ``user_features [B, F]`` int64 indices, one column per single-valued user feature in
    ``config.user_features`` order, and ``history [B, L]`` int64 item indices (most recent last or
    first: the bag is a mean, order does not matter). Index 0 is unknown/padding and contributes
    nothing, exactly as a missing value in training. Output: ``[B, output_dim]``, L2-normalised.
    """

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        cfg = model.config
        multi = sorted(set(cfg.multi_valued) & set(cfg.user_features))
        if multi:
            raise ValueError(
                f"user feature(s) {multi} are multi-valued; the exported query encoder takes one id per "
                "user feature"
            )
        bags = model.sparse_arch.embedding_bags
        self.feature_names = list(cfg.user_features)
        # copies, so the encoder owns plain tensors (no TorchRec module in the exported graph)
        self.user_tables = nn.ParameterList(
            [nn.Parameter(bags[cfg.table_of(f)].weight.detach().clone(), False) for f in self.feature_names]
        )
        self.history_length = cfg.history_length
        self.history_table = (
            nn.Parameter(bags[cfg.table_of(cfg.history_feature)].weight.detach().clone(), False)
            if cfg.history_length
            else None
        )
        self.tower = model.user_tower

    def forward(self, user_features: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, table in enumerate(self.user_tables):
            ids = user_features[:, i]
            parts.append(table[ids] * (ids > 0).unsqueeze(1).to(table.dtype))
        if self.history_table is not None:
            mask = (history > 0).to(self.history_table.dtype)
            summed = (self.history_table[history] * mask.unsqueeze(2)).sum(1)
            parts.append(summed / mask.sum(1, keepdim=True).clamp(min=1.0))
        return F.normalize(self.tower(torch.cat(parts, 1)), dim=-1)
