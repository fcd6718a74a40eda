"""Sequential next-item recommendation (SASRec, GRU4Rec) as a sharded LightningModule, and its export.

Every position of every training sequence predicts its next item, with one of three losses
(``model.loss``):

* ``bce``: the SASRec paper's: ``-log s(h.e_pos) - log(1 - s(h.e_neg))`` with one negative per
  position drawn uniformly from the items the user has not trained on.
* ``ce``: full softmax over every item (the padding row 0 excluded).
* ``sampled_softmax``: softmax over the positive and ``num_negatives`` items drawn per sequence
  from a proposal ``q`` (uniform or popularity), with the logQ correction (Yi et al., RecSys 2019):
  every logit becomes ``h.e - log q(item)``, which makes the sampled softmax a consistent
  estimate of the full one; negatives equal to the position's positive are masked out.

The loss is the mean over every target position of the *global* batch: each rank's sum is
scaled by ``world_size / global count``, because DDP (dense) and TorchRec (sparse, gradient
division) both average the ranks' gradients, and ranks hold different numbers of positions.

Full softmax with a row-wise sharded table. The item logits are computed where the rows live:
each rank owns a contiguous range of item rows (its row-wise shard from the sharding plan, or an
even split for other sharding types) and looks those rows up through the same
``EmbeddingCollection`` (the ``out`` feature), so the lookup stays on the rank and the gradients
of the output side reach the table through TorchRec's backward and its fused optimizer (reading the
shard's weight directly would bypass the fused optimizer, whose table only learns through
lookups). The queries, which are small (``positions x d``), are all-gathered; each rank computes
the log-sum-exp of every query over its own rows, chunk of queries by chunk (the logits are never
materialised whole, and the backward recomputes them: :class:`_LocalLogSumExp`), and the per-rank
values are combined across ranks (all-reduce of their max, then of the sum of their exponentials,
both differentiable). No rank ever holds more than its shard of the table, or more than a chunk of
``rows / world``-wide logits.

Evaluation, two protocols, reported under separate names and never mixed:

1. ``{split}/sampled_*`` (the paper's): the held-out item ranked among ``eval_negatives`` (100)
   items drawn uniformly from those the user never interacted with; HR@10, NDCG@10, MRR, ties
   counted against the target (:func:`trainer.topk_metrics.single_target_metrics`).
2. ``{split}/full_*``: the held-out item ranked among all items (padding excluded); HR@K, NDCG@K
   for K in ``ks`` (10, 20) and MRR (:func:`trainer.topk_metrics.topk_metrics_from_scores`). Items
   of the user's history are *not* excluded, the convention of recent SASRec papers for
   leave-one-out full ranking (a user may consume an item again; excluding would need the
   history of every user on every rank). Each rank scores the all-gathered queries against its
   item rows and the score blocks are exchanged (all-to-all), so each rank ends with full score rows
   for its own users only.

Both are accumulated per user and all-reduced (:class:`trainer.topk_metrics.TopKAccumulator`), so
the numbers do not depend on the world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data.sequential import NegativeSampling, SequenceBatch, SequentialDataModule
from models.gru4rec import GRU4Rec, GRU4RecConfig
from models.sasrec import ITEM_TABLE, PAD, QueryEncoder, SASRec, SASRecConfig, SequentialRecommender
from trainer.collectives import AllReduceSum, gather_padded, rank_and_world
from trainer.config import DenseOptimizerConfig, LrScheduleConfig, RunConfig, load_config
from trainer.module import ShardedModule
from trainer.sharding import ConfigError, describe_plan
from trainer.topk_metrics import (
    TopKAccumulator,
    metric_names,
    single_target_metrics,
    topk_metrics_from_scores,
)

if TYPE_CHECKING:
    from trainer.faiss_export import IndexConfig

LOSSES = ("bce", "ce", "sampled_softmax")
ModelConfig = SASRecConfig | GRU4RecConfig


@dataclass
class SequentialTaskConfig:
    """The non-architecture keys of the ``model:`` section."""

    loss: str = "bce"  # bce | ce | sampled_softmax
    num_negatives: int = 100  # sampled_softmax: negatives per sequence
    negative_sampler: str = "popularity"  # sampled_softmax proposal: uniform | popularity (count + 1)
    eval_negatives: int = 100  # protocol 1: sampled candidates per user
    ks: list[int] = field(default_factory=lambda: [10, 20])  # protocol 2 cut-offs
    sampled_ks: list[int] = field(default_factory=lambda: [10])  # protocol 1 cut-offs
    compile: bool = False  # torch.compile the dense encoder
    # protocol 2 in validation too (test always has both); off makes per-epoch validation cheap on
    # big catalogs, where scoring every user against every item dominates an epoch on CPUs
    validate_full_ranking: bool = True
    # protocol 2 in test; off only to scan checkpoints cheaply (a benchmark's progress checks)
    test_full_ranking: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss {self.loss!r}: choose from {LOSSES}")
        if self.eval_negatives <= 0:
            raise ValueError(f"model.eval_negatives must be > 0, got {self.eval_negatives}")
        for name in ("ks", "sampled_ks"):
            values = getattr(self, name)
            if not values or any(int(k) <= 0 for k in values):
                raise ValueError(f"model.{name} must be a non-empty list of positive integers, got {values}")
        self.negative_sampling()  # validates num_negatives and negative_sampler

    def negative_sampling(self) -> NegativeSampling:
        if self.loss == "bce":
            return NegativeSampling("per_position")
        if self.loss == "sampled_softmax":
            return NegativeSampling("per_sequence", self.num_negatives, self.negative_sampler)
        return NegativeSampling("none", sampler=self.negative_sampler)


def build_model(config: ModelConfig, device: torch.device | None = None) -> SequentialRecommender:
    if isinstance(config, SASRecConfig):
        return SASRec(config, device)
    return GRU4Rec(config, device)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits from autocast are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# Logits per chunk in :class:`_LocalLogSumExp`. CPUs: ~2 MiB, which stays in cache through the
# matmul, the exp and the sum, but at least 32 query rows, below which the matmul loses more than the
# cache gains (measured on 1 core: 44 rows x 11,857 items 2x faster than one [900, 11,857] block, 5
# rows slower). GPUs have the bandwidth for far larger chunks, and fewer launches matter more there.
_LSE_CHUNK_ELEMENTS = {"cpu": 1 << 19}
_LSE_CHUNK_ELEMENTS_DEFAULT = 1 << 27
_LSE_MIN_CHUNK_ROWS = 32


def _matmul_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """The dtype ``x @ y.T`` would have here: autocast's (bf16 on GPUs) when it is on."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, y.dtype)


class _LocalLogSumExp(torch.autograd.Function):
    """``logsumexp_j(q_i . c_j)`` over the given candidates, chunk of query rows by chunk.

    Neither pass materialises the ``[queries, candidates]`` logits: the forward keeps one chunk at a
    time, and the backward recomputes a chunk's logits (one more matmul) instead of storing them.
    On CPUs a stored ``[n, m]`` buffer costs more than the matmul it saves: it is written, page-faulted
    and read back several times at memory speed, where a chunk stays in cache (a rank's share of the
    Video catalog, 900 queries x 11,857 items, on one core: forward + backward 112 ms with the whole
    logits, 53 ms in chunks, the extra matmul included). The matmuls run in the autocast dtype (bf16
    on GPUs), the exponentials and sums in float32.
    """

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        dtype = _matmul_dtype(queries, candidates)
        out_dtype = torch.promote_types(dtype, torch.float32)
        n, m = queries.shape[0], candidates.shape[0]
        lse = torch.full((n,), float("-inf"), dtype=out_dtype, device=queries.device)
        elements = _LSE_CHUNK_ELEMENTS.get(queries.device.type, _LSE_CHUNK_ELEMENTS_DEFAULT)
        step = max(_LSE_MIN_CHUNK_ROWS, elements // max(m, 1))
        if m:
            with torch.autocast(queries.device.type, enabled=False):
                q, c = queries.to(dtype), candidates.to(dtype)
                for lo in range(0, n, step):
                    logits = (q[lo : lo + step] @ c.T).to(out_dtype)
                    top = logits.amax(dim=1)
                    lse[lo : lo + step] = top + logits.sub_(top[:, None]).exp_().sum(dim=1).log_()
        ctx.save_for_backward(queries, candidates, lse)
        ctx.dtype, ctx.step = dtype, step
        return lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries, candidates, lse = ctx.saved_tensors
        dtype, step = ctx.dtype, ctx.step
        grad_q = torch.zeros(queries.shape, dtype=dtype, device=queries.device)
        grad_c = torch.zeros(candidates.shape, dtype=lse.dtype, device=candidates.device)
        if candidates.shape[0]:
            with torch.autocast(queries.device.type, enabled=False):
                q, c = queries.to(dtype), candidates.to(dtype)
                for lo in range(0, q.shape[0], step):
                    # d lse_i / d logit_ij = softmax_ij, recomputed exactly as in the forward
                    p = (q[lo : lo + step] @ c.T).to(lse.dtype)
                    p = p.sub_(lse[lo : lo + step, None]).exp_().mul_(grad[lo : lo + step, None]).to(dtype)
                    grad_q[lo : lo + step] = p @ c
                    if dtype == grad_c.dtype:
                        grad_c.addmm_(p.T, q[lo : lo + step])
                    else:  # low-precision matmul, float32 accumulation over chunks
                        grad_c += (p.T @ q[lo : lo + step]).to(grad_c.dtype)
        return grad_q.to(queries.dtype), grad_c.to(candidates.dtype)


def local_logsumexp(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``logsumexp_j(queries_i . candidates_j)`` ``[n]`` (at least float32; -inf without candidates)."""
    return _LocalLogSumExp.apply(queries, candidates)


def distributed_logsumexp(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``logsumexp_i(q . c_i)`` over the candidates of *every* rank, for this rank's ``queries [n, d]``.

    ``candidates [m_r, d]`` are this rank's part of the catalog (disjoint across ranks, ``m_r`` may
    be 0). Every rank computes the log-sum-exp of all ranks' queries over its own candidates, and the
    per-rank values are combined: ``lse = M + log sum_r exp(lse_r - M)`` with ``M`` the largest
    ``lse_r`` (all-reduces of ``[queries]`` numbers; no logits cross ranks). Differentiable with
    respect to both: the gradient of a candidate row collects every rank's queries, the gradient of
    a query every rank's candidates.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local_logsumexp(queries, candidates)
    all_queries, sizes = gather_padded(queries, differentiable=True)
    local = local_logsumexp(all_queries, candidates)  # [world * max_n]
    shift = local.detach().clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX)  # a shift only: no gradient needed
    lse = shift + torch.log(AllReduceSum.apply(torch.exp(local - shift)))
    start = rank * max(sizes)
    return lse[start : start + sizes[rank]]


def sampled_scores(
    hidden: torch.Tensor, out: torch.Tensor, num_negatives: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Protocol 1 (the paper's): each user's true next item against its ``num_negatives`` samples.

    ``hidden [B, L, d]`` and ``out`` are the model's outputs for ``out_ids = [targets (B),
    negatives.flatten() (B * C), ...]``. Returns the queries ``[B, d]`` (the last position: left
    padding puts the most recent item there), the targets' scores ``[B]`` and the negatives' ``[B, C]``.
    """
    b, c = hidden.shape[0], num_negatives
    query = hidden[:, -1].float()
    candidates = out[: b + b * c].float()
    target = (query * candidates[:b]).sum(dim=1)
    negative = torch.bmm(candidates[b:].view(b, c, -1), query[:, :, None])[:, :, 0]
    return query, target, negative


@torch.no_grad()
def full_scores(queries: torch.Tensor, candidates: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Scores ``[n_r, sum(counts)]`` of this rank's queries against the candidates of all ranks.

    ``candidates [counts[rank], d]`` are this rank's rows; the columns of the result are every
    rank's rows in rank order. Each rank scores all queries against its rows, then the blocks are
    exchanged so that no rank holds another rank's table rows or another rank's users' scores.
    """
    rank, world = rank_and_world()
    if world == 1:
        return queries @ candidates.T
    all_queries, sizes = gather_padded(queries, differentiable=False)
    step = max(sizes)
    blocks = [all_queries[r * step : r * step + sizes[r]] @ candidates.T for r in range(world)]
    send = torch.cat([b.reshape(-1) for b in blocks])
    recv_splits = [sizes[rank] * c for c in counts]
    recv = send.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, recv_splits, [b.numel() for b in blocks])
    parts = recv.split(recv_splits)
    return torch.cat([p.view(sizes[rank], c) for p, c in zip(parts, counts, strict=True)], dim=1)


def candidate_ranges(plan_rows: list[dict[str, Any]], num_items: int, world: int) -> list[tuple[int, int]]:
    """The item rows ``[lo, hi)`` whose logits each rank computes (row 0, the padding, excluded).

    A row-wise sharded item table gives each rank its own shard, so the output-side lookups never
    leave the rank; other sharding types get an even split (their lookups then travel, but no rank
    looks up more than its share of the catalog).
    """
    row = next((r for r in plan_rows if r["table"] == ITEM_TABLE), None)
    ranges: list[tuple[int, int]]
    if row is not None and row["sharding_type"] in ("row_wise", "table_row_wise"):
        ranges = [(0, 0)] * world
        for shard in row["shards"]:
            lo = int(shard["offsets"][0])
            ranges[int(shard["rank"])] = (lo, lo + int(shard["sizes"][0]))
    else:
        block = -(-num_items // world)
        ranges = [(min(r * block, num_items), min((r + 1) * block, num_items)) for r in range(world)]
    ranges = [(max(lo, 1), max(hi, 1)) for lo, hi in ranges]
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
    if not np.array_equal(covered, np.arange(1, num_items)):
        raise ValueError(f"item rows per rank {ranges} do not cover 1..{num_items - 1} in rank order")
    return ranges


# -- losses ------------------------------------------------------------------------------------
def bce_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Per position: ``-log s(pos) - log(1 - s(neg))``."""
    return F.softplus(-_fp32(pos_logits)) + F.softplus(_fp32(neg_logits))


def sampled_softmax_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, pos_log_q: torch.Tensor,
                         neg_log_q: torch.Tensor, accidental: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per position: cross-entropy of the positive among ``[pos, negatives]`` after logQ correction.

    ``pos_logits [n]``, ``neg_logits [n, N]``; ``log q`` of the same shapes; ``accidental [n, N]``
    marks negatives that are the position's positive (removed, not counted as negatives).
    """
    pos = _fp32(pos_logits) - pos_log_q
    neg = (_fp32(neg_logits) - neg_log_q).masked_fill(accidental, float("-inf"))
    return torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos


# -- the LightningModule -------------------------------------------------------------------------
class SequentialModule(ShardedModule):
    def __init__(
        self,
        config: ModelConfig,
        task: SequentialTaskConfig | None = None,
        proposal: np.ndarray | None = None,
        dense_optimizer: DenseOptimizerConfig | None = None,
        init_seed: int = 0,
        lr_schedule: LrScheduleConfig | None = None,
    ) -> None:
        super().__init__(dense_optimizer, init_seed, lr_schedule)
        self.config = config
        self.task = task or SequentialTaskConfig()
        self.num_items = config.num_items
        if self.task.loss == "sampled_softmax" and proposal is None:
            raise ValueError("sampled_softmax needs the proposal distribution of its negatives")
        # log q of the negatives' proposal; a plain tensor (not a buffer): not part of the checkpoint
        self._log_q: torch.Tensor | None = None
        if proposal is not None:
            with np.errstate(divide="ignore"):  # the padding row has q = 0: log q = -inf, never drawn
                self._log_q = torch.from_numpy(np.log(proposal)).float()
        self._ranges: list[tuple[int, int]] = [(1, self.num_items)]
        self._full_names = metric_names(tuple(self.task.ks), ("hr", "ndcg"))
        self._sampled_names = metric_names(tuple(self.task.sampled_ks), ("hr", "ndcg"))
        self._acc = {
            (split, protocol): TopKAccumulator(names)
            for split in ("val", "test")
            for protocol, names in (("full", self._full_names), ("sampled", self._sampled_names))
        }

    def build_model(self, device: torch.device) -> nn.Module:
        return build_model(self.config, device)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        assert self.model is not None
        strategy = self.trainer.strategy
        rows = describe_plan(strategy.plans["model"]) if "model" in getattr(strategy, "plans", {}) else []
        self._ranges = candidate_ranges(rows, self.num_items, self.trainer.world_size)
        if self.task.compile:
            self.model.module.encoder.compile()

    def _local_candidates(self, device: torch.device) -> torch.Tensor:
        lo, hi = self._ranges[self.trainer.global_rank]
        return torch.arange(lo, hi, device=device)

    def forward(self, seq: torch.Tensor, out_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.model is not None
        return self.model(seq, out_ids)

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: SequenceBatch, batch_idx: int) -> torch.Tensor:
        valid = batch.targets != PAD
        targets = batch.targets[valid]
        n = targets.numel()
        loss_name = self.task.loss
        if loss_name == "bce":
            extra = batch.negatives[valid]
        elif loss_name == "sampled_softmax":
            extra = batch.negatives.reshape(-1)
        else:
            extra = self._local_candidates(targets.device)
        hidden, out = self(batch.inputs, torch.cat([targets, extra]))
        h = hidden[valid]
        pos_logits = (h * out[:n]).sum(dim=1)
        if loss_name == "bce":
            per_position = bce_loss(pos_logits, (h * out[n:]).sum(dim=1))
        elif loss_name == "sampled_softmax":
            negatives = out[n:].view(batch.negatives.shape[0], batch.negatives.shape[1], -1)
            neg_logits = torch.bmm(hidden, negatives.transpose(1, 2))[valid]  # [n, N]
            neg_ids = batch.negatives[valid.nonzero()[:, 0]]  # each position's row's negatives
            assert self._log_q is not None
            log_q = self._log_q.to(targets.device)
            per_position = sampled_softmax_loss(
                pos_logits, neg_logits, log_q[targets], log_q[neg_ids], neg_ids == targets[:, None]
            )
        else:
            per_position = distributed_logsumexp(h, out[n:]) - _fp32(pos_logits)
        loss = per_position.sum() * self._global_scale(n, targets.device)
        self.log("train/loss", per_position.detach().mean(), prog_bar=True, batch_size=batch.batch_size)
        return loss

    def _global_scale(self, local_count: int, device: torch.device) -> float:
        """``world / positions in the global batch``: makes the ranks' averaged gradients a global mean."""
        _, world = rank_and_world()
        if world == 1:
            return 1.0 / max(local_count, 1)
        total = torch.tensor([float(local_count)], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return world / max(float(total.item()), 1.0)

    # -- evaluation ------------------------------------------------------------------------------
    def _full_ranking(self, split: str) -> bool:
        return self.task.validate_full_ranking if split == "val" else self.task.test_full_ranking

    def _eval_step(self, split: str, batch: SequenceBatch) -> None:
        b, c = batch.negatives.shape
        full = self._full_ranking(split)
        local = self._local_candidates(batch.targets.device)[: None if full else 0]
        out_ids = torch.cat([batch.targets, batch.negatives.reshape(-1), local])
        hidden, out = self(batch.inputs, out_ids)
        query, target_scores, negative_scores = sampled_scores(hidden, out, c)
        sampled = single_target_metrics(target_scores, negative_scores, tuple(self.task.sampled_ks))
        self._acc[(split, "sampled")].update(sampled)
        if not full:
            return
        counts = [hi - lo for lo, hi in self._ranges]
        scores = full_scores(query, out[b + b * c :].float(), counts)  # column j = item j + 1
        hits = F.one_hot(batch.targets - 1, self.num_items - 1).bool()
        self._acc[(split, "full")].update(topk_metrics_from_scores(scores, hits, tuple(self.task.ks)))

    def _eval_epoch_end(self, split: str) -> None:
        for protocol in ("sampled", "full") if self._full_ranking(split) else ("sampled",):
            acc = self._acc[(split, protocol)]
            values = acc.compute(self.trainer.strategy.root_device)
            acc.reset()
            for name, value in values.items():
                if name != "users":
                    self.log(f"{split}/{protocol}_{name}", value, prog_bar=name == "ndcg@10",
                             rank_zero_only=False)  # fmt: skip


# -- recipes -------------------------------------------------------------------------------------
def _split_model_section(cfg: RunConfig) -> tuple[dict[str, Any], SequentialTaskConfig]:
    model = dict(cfg.model)
    task_keys = {f.name for f in dataclasses.fields(SequentialTaskConfig)}
    try:
        task = SequentialTaskConfig(**{k: model.pop(k) for k in list(model) if k in task_keys})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e
    return model, task


def build_sequential(cfg: RunConfig, kind: str) -> tuple[SequentialModule, SequentialDataModule]:
    """The LightningModule and data module of a ``sasrec`` or ``gru4rec`` run config."""
    config_cls: type[SASRecConfig] | type[GRU4RecConfig] = SASRecConfig if kind == "sasrec" else GRU4RecConfig
    model_kwargs, task = _split_model_section(cfg)
    if cfg.data.features is not None:
        raise ConfigError("data.features does not apply to sequential models (they read sequences.items)")
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    try:
        dm = SequentialDataModule(
            cfg.data.path,
            max_len=int(model_kwargs.get("max_len", defaults["max_len"])),
            batch_size=cfg.data.batch_size,
            eval_batch_size=cfg.data.eval_batch_size,
            seed=cfg.data.seed,
            negatives=task.negative_sampling(),
            eval_negatives=task.eval_negatives,
        )
        model_config = config_cls(num_items=dm.num_items, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e
    proposal = dm.splits.proposal if task.loss == "sampled_softmax" else None
    module = SequentialModule(
        model_config, task, proposal, cfg.optimizer, init_seed=cfg.trainer.seed, lr_schedule=cfg.lr_schedule
    )
    return module, dm


def sasrec_recipe(cfg: RunConfig) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    return build_sequential(cfg, "sasrec")


def gru4rec_recipe(cfg: RunConfig) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    return build_sequential(cfg, "gru4rec")


# -- export --------------------------------------------------------------------------------------
def export_query_encoder(encoder: QueryEncoder, max_len: int) -> torch.export.ExportedProgram:
    """``torch.export`` of the query tower: input ``[batch, max_len]``, the batch dimension dynamic.

    The length is fixed at ``max_len`` (serving left-pads to it): the GRU's export specialises the
    sequence length, and one input contract for every sequential model keeps serving simple.
    """
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    example = torch.ones(4, max_len, dtype=torch.int64)
    example[0, : max_len // 2] = PAD
    return torch.export.export(encoder.eval(), (example,), dynamic_shapes={"seq": {0: batch}})


def _item_ids(dm: SequentialDataModule) -> np.ndarray:
    info = dm.dataset.info("sequences", "items")
    if not info.idmap:  # hashed item ids: the index is all there is
        return np.arange(1, dm.num_items, dtype=np.int64)
    raw = dm.dataset.idmap(info.idmap)
    if len(raw) != dm.num_items - 1:
        raise ValueError(f"{dm.path}: item id map has {len(raw)} ids, the item vocabulary {dm.num_items - 1}")
    return raw


def export_sequential(
    cfg: RunConfig,
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    index: IndexConfig | str | None = None,
    *,
    overwrite: bool = False,
    max_queries: int = 2000,
) -> Path:
    """Write the next-item retrieval artifact of a ``sasrec``/``gru4rec`` checkpoint (any world size).

    The FAISS index holds the item embeddings (the tied output embeddings, rows ``1..n``; row ``r``
    of the index is raw item ``ids.npy[r]``); ``encoder.pt2`` maps a user's recent items to the
    query vector, scored against the index by inner product. The ANN evaluation uses the query
    vectors of real test users.
    """
    from data.shards import dataset_fingerprint
    from trainer.checkpoint import load_unsharded
    from trainer.faiss_export import IndexConfig, write_retrieval_artifact
    from trainer.retrieval import model_fingerprint

    if cfg.model_name not in ("sasrec", "gru4rec"):
        raise ConfigError(f"model_name is {cfg.model_name!r}, not a sasrec or gru4rec config")
    index_cfg = IndexConfig(kind=index) if isinstance(index, str) else (index or IndexConfig())
    module, dm = build_sequential(cfg, cfg.model_name)
    model = build_model(module.config, torch.device("cpu"))
    load_unsharded(model, checkpoint)
    model.eval()
    weight = model.item_weight().detach()
    encoder = QueryEncoder(weight, model.encoder).eval()
    rows = dm.splits.rows["test"][:max_queries]
    queries = None
    if len(rows):
        with torch.no_grad():
            queries = encoder(dm.splits.eval_batch(rows, "test").inputs).numpy()
    max_len = module.config.max_len
    meta = {
        "model_type": cfg.model_name,
        "model_fingerprint": model_fingerprint(model, module.config),  # type: ignore[arg-type]
        "data_fingerprint": dataset_fingerprint(dm.path),
        "dataset": {"path": str(dm.path), "name": dm.dataset.name},
        "checkpoint": str(checkpoint),
        "model_config": dataclasses.asdict(module.config),
        "input_spec": {
            "seq": {
                "dtype": "int64", "shape": ["batch", max_len], "max_length": max_len, "padding": 0,
                "index": "row of ids.npy + 1; 0 = padding",
                "order": f"the newest {max_len} items, oldest to newest, left-padded with 0 "
                         "(the most recent item is the last column)",
            },
            "output": {"dtype": "float32", "shape": ["batch", module.config.embedding_dim],
                       "normalised": False, "score": "inner product with the index vectors"},
        },
        "id_maps": {"seq": {"index": "row of ids.npy + 1; 0 = padding", "raw_ids": "ids.npy"}},
    }  # fmt: skip
    return write_retrieval_artifact(
        Path(out), weight[1:].numpy(), _item_ids(dm), index_cfg,
        query_encoder=export_query_encoder(encoder, max_len), meta=meta, overwrite=overwrite, queries=queries,
    )  # fmt: skip


def export_sasrec(
    checkpoint: str | os.PathLike[str],
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    index: IndexConfig | str | None = None,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> Path:
    """:func:`export_sequential` from a config file (``sasrec`` or ``gru4rec``) and ``--set`` overrides."""
    return export_sequential(load_config(config, overrides), checkpoint, out, index, overwrite=overwrite)


def export_sequential_cmd(args: argparse.Namespace) -> int:
    """CLI hook: ``args.checkpoint``, ``args.config``, ``args.out``, ``args.index`` (index kind or
    None for exact search) and ``args.overwrite``; prints the artifact path, returns the exit code."""
    try:
        path = export_sasrec(
            args.checkpoint,
            args.config,
            args.out,
            args.index,
            bool(args.overwrite),
            getattr(args, "overrides", []),
        )
    except ConfigError as e:
        print(f"funnel: config error: {e}", file=sys.stderr, flush=True)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"funnel: {e}", file=sys.stderr, flush=True)
        return 1
    print(path, flush=True)
    return 0
