"""Two-tower retrieval as a sharded LightningModule: sampled-softmax losses, full-ranking evaluation,
the ``two_tower`` recipe and the FAISS export.

Loss (:func:`sampled_softmax_loss`, a pure function): every query is scored against a candidate
pool of the batch's positive items (in-batch negatives, Yi et al., RecSys 2019), optionally
``N`` items drawn uniformly from the catalog (mixed negatives, Yang et al., WWW 2020) and, across
ranks, the other ranks' candidates (all-gathered *with* gradient, so the pool is the global batch
and every rank's item tower learns from every rank's queries).

* logQ correction: the pool is a sample, not the catalog, so popular items are over-represented
  as negatives. Each candidate's logit is reduced by ``log Q(j)``, the log of the expected number
  of copies of item ``j`` in the pool: ``Q(j) = B * p(j) + N / I`` for a pool of ``B`` in-batch
  positives (each item ``j`` with probability ``p(j)``, its share of the training interactions)
  and ``N`` uniform draws from ``I`` items (:func:`mixture_log_q`). The same correction applies to
  every copy of ``j``, whichever source it came from: the pool as a whole is a sample from that
  mixture. With ``N = 0`` it is Yi et al.'s ``log p(j)`` up to a constant, which cancels in the
  softmax. ``logq_weight`` ``w`` scales the correction: the scores then learn ``log p(j | u)`` plus
  a popularity prior ``(w - 1) log Q(j)``, which full-ranking recall can reward (ML-1M: ~1.3).
* Accidental hits: a candidate that is another positive of the query's user (the same item id,
  or any item of the same user in the batch) is removed from that query's softmax instead of
  being pushed away.
* ``logq_source: streaming`` replaces the training split's item shares by Yi et al.'s online
  estimate (:class:`trainer.logq.StreamingItemFrequency`, fed the global batch's positives on every
  rank, so all ranks hold the same estimate; its state is checkpointed with the module).
* ``kind: multinomial`` (:func:`catalog_softmax_loss`): no sample at all. A training row is a user,
  whose bag holds all their training items thinned by ``history_dropout``, scored against the whole
  catalog (each rank embeds a slice, all-gathered with gradient) with the multinomial likelihood of
  their training items: Mult-DAE's training (Liang et al., WWW 2018) in the two towers' form, for
  catalogs small enough to score every step (ML-1M's 3,043 items: measured better than the
  in-batch softmax there, see benchmarks/two_tower.py).
* ``kind: ccl``: SimpleX's cosine contrastive loss (Mao et al., CIKM 2021) on the same pool instead
  of the softmax; ``in_batch_negatives: false`` keeps only the uniform samples as negatives (the
  pool SimpleX draws). ``user_l2`` penalises the squared norms of the batch's user-feature rows.

Evaluation: every rank computes the embeddings of a slice of the catalog through the sharded
item tower (all ranks together, since the tables are sharded), the slices are all-gathered, and
each rank ranks all items for its own users; :class:`trainer.topk_metrics.TopKAccumulator`
all-reduces the sums. Items the user saw in the visible splits are excluded. The popularity
ranking (training counts) is scored on the same users in the same pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.retrieval import HISTORY, CatalogBatch, RetrievalBatch, RetrievalDataModule, UserBatch
from models.two_tower import QueryEncoder, TwoTower, TwoTowerConfig
from trainer.checkpoint import load_unsharded
from trainer.collectives import AllGatherRows, gather_rows, rank_and_world
from trainer.config import DenseOptimizerConfig, LrScheduleConfig, RunConfig, load_config
from trainer.logq import StreamingItemFrequency
from trainer.module import ShardedModule
from trainer.sharding import ConfigError
from trainer.topk_metrics import TopKAccumulator, mask_scores, metric_names, topk_metrics_from_scores

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 50, 100)


LOSS_KINDS = ("softmax", "ccl", "multinomial")
LOGQ_SOURCES = ("data", "streaming")


@dataclass
class RetrievalLossConfig:
    # softmax: sampled softmax | ccl: SimpleX's cosine contrastive loss | multinomial: each user's
    # training items under a softmax over the whole catalog (Mult-DAE's likelihood; batches of users)
    kind: str = "softmax"
    logq_correction: bool = True
    logq_weight: float = 1.0  # scales the correction: 1 = unbiased full softmax, > 1 favours popular items
    # data: item shares of the training split; streaming: estimated online from the batches' items
    # (Yi et al.'s Algorithm 2, trainer.logq), for streams whose frequencies are not known up front
    logq_source: str = "data"
    num_negatives: int = 0  # uniformly sampled items per global batch (mixed negatives); 0 = in-batch only
    remove_accidental_hits: bool = True
    cross_rank_negatives: bool = True  # all-gather candidates so the pool is the global batch
    in_batch_negatives: bool = True  # False: only the uniformly sampled items are negatives
    margin: float = 0.9  # ccl: negatives with a cosine below the margin cost nothing
    negative_weight: float = 1.0  # ccl: weight of the mean negative term against the positive one
    user_l2: float = 0.0  # L2 penalty on the batch's user-feature embeddings (SimpleX's regulariser)

    def __post_init__(self) -> None:
        if self.logq_source not in LOGQ_SOURCES:
            raise ValueError(f"model.loss.logq_source {self.logq_source!r}: choose one of {LOGQ_SOURCES}")
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"model.loss.kind {self.kind!r}: choose one of {LOSS_KINDS}")
        if not self.logq_weight >= 0:
            raise ValueError(f"model.loss.logq_weight must be >= 0, got {self.logq_weight}")
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"model.loss.margin must be a cosine in [-1, 1], got {self.margin}")
        if not self.user_l2 >= 0:
            raise ValueError(f"model.loss.user_l2 must be >= 0, got {self.user_l2}")
        if not self.negative_weight > 0:
            raise ValueError(f"model.loss.negative_weight must be > 0, got {self.negative_weight}")
        if self.kind == "multinomial" and (self.logq_correction or self.num_negatives):
            raise ValueError(
                "model.loss.kind multinomial scores the whole catalog, not a sample: set "
                "logq_correction: false and num_negatives: 0"
            )
        if not self.in_batch_negatives and self.num_negatives <= 0:
            raise ValueError("model.loss.in_batch_negatives false needs model.loss.num_negatives > 0")


# -- the loss ------------------------------------------------------------------------------------
def mixture_log_q(
    item_prob: torch.Tensor, batch_candidates: int, num_negatives: int, num_items: int
) -> torch.Tensor:
    """``log(B * p + N / I)``: log expected copies of each candidate's item in the pool."""
    expected = batch_candidates * item_prob.double() + num_negatives / num_items
    return torch.log(expected.clamp(min=1e-30)).to(item_prob.dtype)


def accidental_hits(
    labels: torch.Tensor, candidate_items: torch.Tensor, candidate_users: torch.Tensor | None
) -> torch.Tensor:
    """``[B, C]`` mask of candidates that are a positive of the query (never the labelled one).

    A hit holds the same item as the query's positive or, with ``candidate_users`` (0 = no user),
    is the positive of the query's own user.
    """
    hit = candidate_items.unsqueeze(0) == candidate_items[labels].unsqueeze(1)
    if candidate_users is not None:
        own = candidate_users[labels].unsqueeze(1)
        hit |= (candidate_users.unsqueeze(0) == own) & (own > 0)
    hit[torch.arange(len(labels), device=hit.device), labels] = False
    return hit


def cosine_contrastive_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    negative_weight: float,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimpleX's CCL (Mao et al., CIKM 2021) of unit ``query [B, D]`` against unit ``candidates [C, D]``.

    ``1 - cos(u, pos) + negative_weight * mean_j relu(cos(u, j) - margin)`` over the candidates that
    are neither the positive nor ``excluded [B, C]`` (accidental hits, candidates kept out of the pool).
    """
    cos = F.normalize(query, dim=-1) @ F.normalize(candidates, dim=-1).T  # a no-op on unit towers
    rows = torch.arange(len(labels), device=cos.device)
    negative = torch.ones_like(cos, dtype=torch.bool)
    negative[rows, labels] = False
    if excluded is not None:
        negative &= ~excluded
    pushed = torch.relu(cos - margin) * negative
    per_query = pushed.sum(1) / negative.sum(1).clamp(min=1)
    return (1 - cos[rows, labels] + negative_weight * per_query).mean()


def sampled_softmax_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    log_q: torch.Tensor | None = None,
    candidate_items: torch.Tensor | None = None,
    candidate_users: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``query [B, D]`` against ``candidates [C, D]``; ``labels [B]`` index positives.

    ``log_q [C]`` is subtracted from the logits (logQ correction). With ``candidate_items [C]``,
    a candidate holding the same item as the query's positive is masked (accidental hit); with
    ``candidate_users [C]`` (0 = no user, e.g. a sampled item) so is any candidate that is the
    positive of the query's own user; ``excluded [B, C]`` masks more candidates. The positive itself is
    never masked.
    """
    # One GEMM adds the bias (-log Q, -inf on accidental hits) to the scaled scores: the [B, C] logit
    # matrix is the bulk of a step on CPUs, so it is written once instead of once per term.
    bias = None
    if log_q is not None:
        bias = (-log_q).unsqueeze(0).expand(query.shape[0], -1)
    hit = None if candidate_items is None else accidental_hits(labels, candidate_items, candidate_users)
    if excluded is not None:
        hit = excluded if hit is None else hit | excluded
    if hit is not None:
        base = bias if bias is not None else query.new_zeros(()).expand(query.shape[0], candidates.shape[0])
        bias = base.masked_fill(hit, float("-inf"))
    scaled = query / temperature
    logits = scaled @ candidates.T if bias is None else torch.addmm(bias, scaled, candidates.T)
    return F.cross_entropy(logits, labels)


def retrieval_loss(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    user_ids: torch.Tensor,
    item_prob: torch.Tensor,
    *,
    cfg: RetrievalLossConfig,
    temperature: float,
    num_items: int,
) -> torch.Tensor:
    """One rank's training loss: ``items`` holds the ``B = len(query)`` positives, then the sampled items.

    With ``cfg.cross_rank_negatives`` and more than one rank, the candidates of all ranks form the
    pool (positives of every rank, then sampled items of every rank: the layout a single rank
    would have with the concatenated batch), so the mean of the ranks' losses equals the loss of
    one rank over the whole global batch.
    """
    b = query.shape[0]
    rank, world = rank_and_world()
    candidates, cand_items, cand_users, cand_prob = items, item_ids, user_ids, item_prob
    labels = torch.arange(b, device=query.device)
    scale = 1
    if cfg.cross_rank_negatives and world > 1:
        # two collectives per step: the embeddings (with gradient) and the ids/probabilities packed
        # in one float64 tensor (exact for ids below 2**53); then [positives of all ranks, samples]
        rows = items.shape[0]
        packed = torch.stack([item_ids.double(), user_ids.double(), item_prob.double()], dim=1)
        offsets = torch.arange(world, device=query.device).unsqueeze(1) * rows
        local = torch.arange(rows, device=query.device).unsqueeze(0)
        order = torch.cat([(offsets + local[:, :b]).flatten(), (offsets + local[:, b:]).flatten()])
        candidates = AllGatherRows.apply(items)[order]
        packed = AllGatherRows.apply(packed)[order]
        cand_items, cand_users = packed[:, 0].long(), packed[:, 1].long()
        cand_prob = packed[:, 2].to(item_prob.dtype)
        labels = labels + rank * b
        scale = world
    num_sampled = (items.shape[0] - b) * scale
    in_batch = b * scale if cfg.in_batch_negatives else 0
    # the other queries' positives leave the pool as negatives (each query keeps its own)
    excluded = None
    if not cfg.in_batch_negatives:
        excluded = torch.zeros(b, candidates.shape[0], dtype=torch.bool, device=query.device)
        excluded[:, : b * scale] = True
        excluded[torch.arange(b, device=query.device), labels] = False
    if cfg.kind == "ccl":
        if cfg.remove_accidental_hits:
            hits = accidental_hits(labels, cand_items, cand_users)
            excluded = hits if excluded is None else excluded | hits
        return cosine_contrastive_loss(
            query, candidates, labels, margin=cfg.margin, negative_weight=cfg.negative_weight,
            excluded=excluded,
        )  # fmt: skip
    log_q = None
    if cfg.logq_correction:
        log_q = cfg.logq_weight * mixture_log_q(cand_prob, in_batch, num_sampled, num_items)
    hits = cfg.remove_accidental_hits
    return sampled_softmax_loss(
        query, candidates, labels, temperature=temperature, log_q=log_q,
        candidate_items=cand_items if hits else None, candidate_users=cand_users if hits else None,
        excluded=excluded,
    )  # fmt: skip


def catalog_softmax_loss(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """Mean over users of ``-sum_{i in targets(u)} log softmax_j(<q_u, v_j> / temperature)``.

    The multinomial likelihood of Mult-DAE (Liang et al., WWW 2018) with the two towers' scores:
    ``items`` are this rank's slice of the catalog (``item_ids``, 0 = padding, never scored) and
    ``targets`` the ``[U, num_items + 1]`` 0/1 mask of each user's training items. Across ranks the
    slices are all-gathered with gradient, so every rank scores the whole catalog and the mean of
    the ranks' losses is the loss of one rank with the concatenated users.
    """
    if rank_and_world()[1] > 1:
        items = AllGatherRows.apply(items)
        item_ids = gather_rows(item_ids)
    scores = (query @ items.T) / temperature
    scores = scores.masked_fill((item_ids == 0).unsqueeze(0), float("-inf"))
    picked = targets[:, item_ids].to(scores.dtype)
    log_p = torch.log_softmax(scores, dim=1).masked_fill(picked == 0, 0.0)
    return -(log_p * picked).sum(1).mean()


# -- the LightningModule -------------------------------------------------------------------------
class TwoTowerModule(ShardedModule):
    pipeline_inputs = {"features": "features"}

    def __init__(
        self,
        config: TwoTowerConfig,
        loss: RetrievalLossConfig | None = None,
        ks: tuple[int, ...] = DEFAULT_KS,
        popularity_baseline: bool = True,
        dense_optimizer: DenseOptimizerConfig | None = None,
        init_seed: int = 0,
        lr_schedule: LrScheduleConfig | None = None,
    ) -> None:
        super().__init__(dense_optimizer, init_seed, lr_schedule)
        if not ks or min(ks) <= 0:
            raise ConfigError(f"model.eval.ks must be positive cut-offs, got {list(ks)}")
        self.config = config
        self.loss_config = loss or RetrievalLossConfig()
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        self.popularity_baseline = popularity_baseline
        self.num_items = config.item_features[config.item_feature] - 1
        names = metric_names(self.ks)
        self._accumulators = {"model": TopKAccumulator(names), "pop": TopKAccumulator(names)}
        self._item_table: torch.Tensor | None = None
        self._popularity: torch.Tensor | None = None
        self.item_frequency = (
            StreamingItemFrequency(self.num_items + 1, self.num_items)
            if self.loss_config.logq_source == "streaming"
            else None
        )

    def build_model(self, device: torch.device) -> nn.Module:
        return TwoTower(self.config, device=device)

    def _datamodule(self) -> RetrievalDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, RetrievalDataModule):
            raise TypeError(f"TwoTowerModule needs a RetrievalDataModule, got {type(dm).__name__}")
        return dm

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch: RetrievalBatch | CatalogBatch, batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        b = batch.num_queries
        penalise = self.loss_config.user_l2 > 0 and bool(self.config.user_features)
        query, items, *norms = self.model(batch.features, b, batch.item.shape[0], penalise)
        if isinstance(batch, CatalogBatch):
            targets = batch.target_mask(self.num_items + 1)
            t = self.config.temperature
            loss = catalog_softmax_loss(query, items, batch.item, targets, temperature=t)
            return self._finish_loss(loss, norms, b)
        item_prob = batch.item_prob
        if self.item_frequency is not None:
            # every rank feeds the global batch's positives, so the estimates stay identical
            self.item_frequency.update(gather_rows(batch.item[:b]))
            item_prob = self.item_frequency.probability(batch.item).to(batch.item_prob.dtype)
        loss = retrieval_loss(
            query, items, batch.item, batch.user, item_prob,
            cfg=self.loss_config, temperature=self.config.temperature, num_items=self.num_items,
        )  # fmt: skip
        return self._finish_loss(loss, norms, b)

    def _finish_loss(self, loss: torch.Tensor, norms: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        if norms:
            loss = loss + self.loss_config.user_l2 * norms[0].mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def item_embeddings(self) -> torch.Tensor:
        """``[num_items + 1, dim]`` embeddings of the whole catalog (row 0, padding, is zero).

        Each rank embeds its slice of every chunk of items, in step with the other ranks (the
        tables are sharded, so the lookups are collective), then the slices are all-gathered.
        """
        assert self.model is not None
        ids, embs = [], []
        for batch in self._datamodule().loader("items"):
            batch = batch.to(self.device)
            _, items = self.model(batch.features, 0, batch.num_items)
            ids.append(batch.item)
            embs.append(items)
        local_ids, local = torch.cat(ids), torch.cat(embs)
        local_ids, local = gather_rows(local_ids), gather_rows(local)
        table = torch.zeros(self.num_items + 1, local.shape[1], device=local.device, dtype=local.dtype)
        table[local_ids] = local
        return table

    def _eval_start(self, split: str) -> None:
        self._item_table = self.item_embeddings()
        counts = torch.from_numpy(self._datamodule().item_counts).to(self.device, torch.float32)
        self._popularity = counts.unsqueeze(0)
        for acc in self._accumulators.values():
            acc.reset()

    @torch.no_grad()
    def _eval_step(self, split: str, batch: UserBatch) -> None:
        assert self.model is not None and self._item_table is not None and self._popularity is not None
        query, _ = self.model(batch.features, batch.num_queries, 0)
        width = self.num_items + 1
        seen = batch.seen_mask(width)
        seen[:, 0] = True  # the padding row is no item
        targets = batch.target_mask(width)
        scores = query @ self._item_table.T  # the temperature does not change the ranking
        self._accumulators["model"].update(
            topk_metrics_from_scores(mask_scores(scores, seen), targets, self.ks)
        )
        if self.popularity_baseline:
            popular = self._popularity.expand(batch.num_queries, -1)
            self._accumulators["pop"].update(
                topk_metrics_from_scores(mask_scores(popular, seen), targets, self.ks)
            )

    def _eval_epoch_end(self, split: str) -> None:
        results = {}
        for source, acc in self._accumulators.items():
            if source == "pop" and not self.popularity_baseline:
                continue
            prefix = "" if source == "model" else "pop_"
            for name, value in acc.compute(self.device).items():
                if name == "users" and source == "pop":
                    continue
                results[f"{split}/{prefix}{name}"] = value
        for key, value in results.items():
            self.log(key, value, prog_bar=key == f"{split}/recall@{self.ks[0]}", rank_zero_only=False)
        self._item_table = None


# -- the recipe ----------------------------------------------------------------------------------
def build_two_tower(cfg: RunConfig) -> tuple[TwoTowerModule, RetrievalDataModule]:
    """The ``two_tower`` recipe.

    ``model:`` holds the TwoTowerConfig fields plus ``user_features`` / ``item_features`` (names;
    default all), ``history_mode`` (``recent`` / ``others``), ``split`` (``dataset`` = the stored
    split, or ``loo`` / ``temporal`` / ``random`` recomputed with ``split_fractions``), ``loss``
    (RetrievalLossConfig), ``history_dropout`` (the chance that a training bag drops each item),
    ``val_fraction`` (carve a validation split out of each user's training interactions, for datasets
    published without one) and ``eval`` (``ks``, ``popularity_baseline``,
    ``history_length``: the history cap of evaluation and exported queries, default
    ``history_length``).
    """
    model = dict(cfg.model)
    try:
        loss = RetrievalLossConfig(**(model.pop("loss", None) or {}))
        evaluation = dict(model.pop("eval", None) or {})
        ks = tuple(evaluation.pop("ks", DEFAULT_KS))
        popularity = bool(evaluation.pop("popularity_baseline", True))
        eval_history = evaluation.pop("history_length", None)
        if "lr_decay_to" in model:
            raise ConfigError(
                "model.lr_decay_to is now the engine's lr_schedule: write lr_schedule: "
                f"{{decay: cosine, decay_to: {model['lr_decay_to']}}} at the top level of the config"
            )
        if evaluation:
            raise ConfigError(
                f"model.eval: unknown key(s) {sorted(evaluation)}; known: ks, popularity_baseline, "
                "history_length"
            )
        dm = RetrievalDataModule(
            cfg.data.path,
            cfg.data.batch_size,
            cfg.data.eval_batch_size,
            cfg.data.seed,
            user_features=model.pop("user_features", None),
            item_features=model.pop("item_features", None),
            history_length=int(model.get("history_length", 20)),
            history_mode=model.pop("history_mode", "recent"),
            num_negatives=loss.num_negatives,
            split=model.pop("split", "dataset"),
            fractions=model.pop("split_fractions", (0.8, 0.1, 0.1)),
            val_fraction=float(model.pop("val_fraction", 0.0)),
            eval_history_length=None if eval_history is None else int(eval_history),
            history_dropout=float(model.pop("history_dropout", 0.0)),
            train_on="users" if loss.kind == "multinomial" else "interactions",
        )
        schema = dm.schema
        model_cfg = TwoTowerConfig(
            user_features={f.name: f.vocab for f in schema.user_features},
            item_features={f.name: f.vocab for f in schema.item_features},
            multi_valued=[f.name for f in schema.user_features + schema.item_features if f.multi_valued],
            history_feature=HISTORY,
            **model,
        )
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"data.path: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e
    module = TwoTowerModule(
        model_cfg, loss, ks, popularity, cfg.optimizer, cfg.trainer.seed, lr_schedule=cfg.lr_schedule
    )
    return module, dm


# -- export --------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module, config: Any) -> str:
    """sha256 of the architecture (a config dataclass) and every weight: equal exactly when the model is."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def unsharded_model(config: TwoTowerConfig, checkpoint: str | os.PathLike[str]) -> TwoTower:
    """The trained two-tower as a plain CPU module (one process, no torchrun)."""
    model = TwoTower(config, device=torch.device("cpu"))
    load_unsharded(model, checkpoint)
    return model.eval()


@torch.no_grad()
def catalog_embeddings(model: TwoTower, dm: RetrievalDataModule, chunk: int = 8192) -> np.ndarray:
    """Embeddings ``[num_items, dim]`` of items ``1..num_items`` (row ``r`` = item index ``r + 1``)."""
    out = []
    for lo in range(1, dm.schema.num_items + 1, chunk):
        batch = dm.item_batch(np.arange(lo, min(lo + chunk, dm.schema.num_items + 1)))
        out.append(model(batch.features, 0, batch.num_items)[1])
    return torch.cat(out).numpy()


@torch.no_grad()
def encode_queries(
    encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dm: RetrievalDataModule,
    stage: str,
    index: np.ndarray,
    chunk: int = 256,
) -> np.ndarray:
    """Embeddings of eval users ``index`` of ``stage`` through a query encoder on plain tensors.

    ``encoder`` is a :class:`QueryEncoder` or the exported program's module: what serving runs. In
    chunks, because the encoder gathers ``[users, history, dim]`` and full histories can be long.
    """
    out = []
    for lo in range(0, len(index), chunk):
        arrays = dm.query_arrays(stage, index[lo : lo + chunk])
        out.append(
            encoder(torch.from_numpy(arrays["user_features"]), torch.from_numpy(arrays["history"])).numpy()
        )
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def export_query_encoder(
    encoder: QueryEncoder, num_user_features: int, history_length: int
) -> torch.export.ExportedProgram:
    """``torch.export`` of the user tower with a dynamic batch (and history length) dimension."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    length = max(history_length, 1)
    example = (torch.ones(4, num_user_features, dtype=torch.int64), torch.ones(4, length, dtype=torch.int64))
    history_dims: dict[int, Any] = {0: batch}
    if history_length:
        history_dims[1] = torch.export.Dim("history", min=1, max=1 << 16)
    return torch.export.export(
        encoder.eval(), example, dynamic_shapes={"user_features": {0: batch}, "history": history_dims}
    )


def _id_maps(dm: RetrievalDataModule) -> dict[str, Any]:
    """How serving turns raw user-side values into the encoder's indices."""
    ds = dm.dataset
    out: dict[str, Any] = {}
    for f in dm.schema.user_features:
        info = ds.info("interactions", "user") if f.name == "user" else ds.info("users", f.name)
        if info.idmap:
            out[f.name] = {
                "index": "position in raw_ids + 1; unknown -> 0",
                "raw_ids": ds.idmap(info.idmap).tolist(),
            }
        elif info.hash_buckets:
            out[f.name] = {
                "index": "1 + stable_hash(raw) % hash_buckets (serving.features.stable_hash: 64-bit "
                "FNV-1a over the string's Unicode code points; integers hash to themselves)",
                "hash_buckets": info.hash_buckets,
            }
        else:
            raise ValueError(f"user feature {f.name!r} has neither an id map nor hashing")
    if dm.schema.history_length:
        out[HISTORY] = {"index": "row of ids.npy + 1; 0 = padding", "raw_ids": "ids.npy"}
    return out


def _item_ids(dm: RetrievalDataModule) -> np.ndarray:
    info = dm.dataset.info("interactions", "item")
    if not info.idmap:  # hashed item ids: the index is all there is
        return np.arange(1, dm.schema.num_items + 1, dtype=np.int64)
    raw = dm.dataset.idmap(info.idmap)
    if len(raw) != dm.schema.num_items:
        raise ValueError(
            f"{dm.path}: item id map has {len(raw)} ids, the item vocabulary {dm.schema.num_items}"
        )
    return raw


def export_two_tower(
    cfg: RunConfig,
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    index: Any,
    *,
    overwrite: bool = False,
    max_queries: int = 2000,
) -> Path:
    """Write the retrieval artifact of a two-tower checkpoint (any world size) from one process.

    The item index holds every catalog item; the query encoder is exported rather than shipping
    precomputed user embeddings, so serving can embed a new user or a user's latest history from
    raw ids. The ANN evaluation uses real user queries (the test users, else the validation ones).
    """
    from data.shards import dataset_fingerprint
    from trainer.faiss_export import write_retrieval_artifact

    module, dm = build_two_tower(cfg)
    model = unsharded_model(module.config, checkpoint)
    items = catalog_embeddings(model, dm)
    encoder = QueryEncoder(model).eval()
    stage = next((s for s in ("test", "val") if dm.eval_users(s) is not None), None)
    queries = None
    if stage is not None:
        count = len(dm.eval_users(stage).users)  # type: ignore[union-attr]
        queries = encode_queries(encoder, dm, stage, np.arange(min(count, max_queries)))
    num_features = len(dm.schema.user_features)
    meta = {
        "model_type": "two_tower",
        "model_fingerprint": model_fingerprint(model, module.config),
        "data_fingerprint": dataset_fingerprint(dm.path),
        "dataset": {"path": str(dm.path), "name": dm.dataset.name, "split": dm.split_spec},
        "checkpoint": str(checkpoint),
        "model_config": dataclasses.asdict(module.config),
        "input_spec": {
            "user_features": {
                "dtype": "int64", "shape": ["batch", num_features],
                "columns": [f.name for f in dm.schema.user_features],
                "index": "id_maps[column]; 0 = unknown (contributes nothing)",
            },
            "history": {
                "dtype": "int64", "shape": ["batch", "history"], "padding": 0,
                "max_length": dm.eval_history_length,
                "mode": dm.history_mode,
                "index": "id_maps.history (row of ids.npy + 1); any order (mean-pooled); all padding "
                         "when the model has no history feature",
                "content": "mode recent: the user's newest max_length items; mode others: up to "
                           "max_length of the user's items",
            },
            "output": {"dtype": "float32", "shape": ["batch", module.config.output_dim], "normalised": True},
        },
        "id_maps": _id_maps(dm),
    }  # fmt: skip
    ep = export_query_encoder(encoder, num_features, dm.eval_history_length)
    return write_retrieval_artifact(
        Path(out),
        items,
        _item_ids(dm),
        index,
        query_encoder=ep,
        meta=meta,
        overwrite=overwrite,
        queries=queries,
    )


def export_from_config(
    config_path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    index: Any,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    cfg = load_config(config_path, overrides)
    if cfg.model_name != "two_tower":
        raise ConfigError(f"{config_path}: model_name is {cfg.model_name!r}, not a two_tower config")
    return export_two_tower(cfg, checkpoint, out, index, overwrite=overwrite)


def iter_user_embeddings(
    model: TwoTower, dm: RetrievalDataModule, stage: str, chunk: int = 4096
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(users, embeddings)`` of a stage's evaluation users through the TorchRec user tower."""
    ev = dm.eval_users(stage)
    if ev is None:
        return
    with torch.no_grad():
        for lo in range(0, len(ev.users), chunk):
            index = np.arange(lo, min(lo + chunk, len(ev.users)))
            batch = dm.user_batch(stage, index)
            yield ev.users[index], model(batch.features, batch.num_queries, 0)[0].numpy()
