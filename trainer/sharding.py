"""Sharding plans: topology, per-table constraints, sharders, and the TorchRec planner.

This is the one module that talks to TorchRec's planner; the strategy and ``funnel plan`` both use
it, so a plan printed by a dry run is the plan a real run of the same shape gets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import SparseType
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbedding
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

log = logging.getLogger(__name__)

GB = 1024**3
SHARDING_TYPES = {t.value for t in ShardingType}
# DATA_PARALLEL is left out by default: TorchRec's in-backward (fused) optimizers do not update
# data-parallel tables, so a small table the planner chose to replicate would silently never train.
DEFAULT_SHARDING_TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise"]


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


@dataclass
class TableSharding:
    sharding_types: list[str] | None = None
    compute_kernels: list[str] | None = None
    ranks: list[int] | None = None


@dataclass
class ShardingConfig:
    compute_device: str = "auto"  # cpu | cuda | auto (cuda when available)
    sharding_types: list[str] = field(default_factory=lambda: list(DEFAULT_SHARDING_TYPES))
    compute_kernels: list[str] | None = None  # e.g. ["fused"]; None lets the planner choose
    tables: dict[str, TableSharding] = field(default_factory=dict)
    hbm_cap_gb: float | None = None  # per rank; None = the device's memory
    ddr_cap_gb: float | None = None  # per rank; None = TorchRec's default
    embedding_precision: str = "fp32"  # fp32 | fp16 (weights stored in half precision)

    def __post_init__(self) -> None:
        self.tables = {
            k: v if isinstance(v, TableSharding) else TableSharding(**(v or {}))
            for k, v in self.tables.items()
        }
        for where, types in [("sharding.sharding_types", self.sharding_types)] + [
            (f"sharding.tables.{k}.sharding_types", v.sharding_types or []) for k, v in self.tables.items()
        ]:
            bad = sorted(set(types) - SHARDING_TYPES)
            if bad:
                raise ConfigError(
                    f"{where}: unknown sharding type(s) {bad}; choose from {sorted(SHARDING_TYPES)}"
                )

    def device_type(self) -> str:
        if self.compute_device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.compute_device


def _with_cpu_row_wise(types: list[str], compute_device_type: str) -> list[str]:
    # TorchRec offers row-wise sharding of pooled tables only for cuda/tpu, yet its CPU kernels and
    # collectives handle it (forward, backward and checkpoints were verified on gloo ranks, and the
    # 1-vs-N parity test guards it), so CPU runs can exercise the sharding types used on GPUs.
    if compute_device_type == "cpu":
        for t in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if t not in types:
                types.append(t)
    return types


class EmbeddingBagCollectionSharderCPURowWise(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        return _with_cpu_row_wise(super().sharding_types(compute_device_type), compute_device_type)


def sharders(fused_params: dict[str, Any] | None = None) -> list[ModuleSharder[nn.Module]]:
    return [
        EmbeddingBagCollectionSharderCPURowWise(fused_params=fused_params),
        EmbeddingCollectionSharder(fused_params=fused_params),
    ]


def _dense_unpooled_kernels(module: nn.Module) -> Iterator[BatchedDenseEmbedding]:
    # the sharded collections keep their lookups in plain lists (a data-parallel one wrapped in DDP),
    # out of reach of ``module.modules()``
    seen: set[int] = set()
    for m in module.modules():
        lookups = getattr(m, "_lookups", None)
        for lookup in lookups if isinstance(lookups, list | nn.ModuleList) else []:
            for kernel in lookup.modules():
                if isinstance(kernel, BatchedDenseEmbedding) and id(kernel) not in seen:
                    seen.add(id(kernel))
                    yield kernel


def _unpooled_lookup(kernel: BatchedDenseEmbedding) -> Callable[[KeyedJaggedTensor], torch.Tensor]:
    # the layout (each feature's first row in the flat weights, the width, the output dtype) is fixed
    # for the kernel's life: worked out once here, not on every lookup
    emb = kernel.emb_module
    dims = {dim for _, dim in emb.embedding_specs}
    if len(dims) != 1:
        raise ValueError(f"unpooled tables of one lookup group differ in width: {sorted(dims)}")
    (dim,) = dims
    first_row = torch.tensor([offset // dim for offset in emb.weights_physical_offsets], dtype=torch.long)
    feature_first_row = first_row[torch.tensor(kernel._feature_table_map, dtype=torch.long)]
    # FBGEMM returns output_dtype (fp32 unless configured), whatever the tables are stored in
    output_dtype = SparseType.from_int(emb.output_dtype).as_dtype()

    def lookup(features: KeyedJaggedTensor) -> torch.Tensor:
        lengths = torch.tensor(features.length_per_key(), dtype=torch.long)
        rows = features.values().long() + torch.repeat_interleave(feature_first_row, lengths)
        return F.embedding(rows, emb.weights.view(-1, dim)).to(output_dtype)

    return lookup


def exact_cpu_unpooled_lookups(module: nn.Module) -> int:
    """Make the CPU ``dense``-kernel lookups of sharded ``EmbeddingCollection``s return one row per id.

    FBGEMM's CPU dense lookup (``DenseTableBatchedEmbeddingBagsCodegen``, TorchRec's kernel for
    data-parallel tables) pools each bag even when built with ``PoolingMode.NONE``, so an unpooled
    collection's lookup returns one row per sequence and the output split fails. This replaces the
    forward of each such kernel on CPU with an ``F.embedding`` over the same flat weights: one row per
    id, the same layout, gradients into the same parameter (which the dense optimizer updates). It is
    what lets a data-parallel item table train with the dense optimizer (e.g. the paper's Adam) on
    CPU. Returns the number of kernels changed; CUDA kernels are left alone.
    """
    changed = 0
    for kernel in _dense_unpooled_kernels(module):
        if kernel.emb_module.weights.device.type == "cpu":
            kernel.forward = _unpooled_lookup(kernel)  # type: ignore[method-assign]
            changed += 1
    return changed


EMBEDDING_PRECISIONS = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def set_embedding_precision(module: nn.Module, precision: str) -> None:
    """Store every table of ``module`` in ``precision`` (before sharding: TorchRec reads the table
    configs' data_type when it builds the FBGEMM kernels)."""
    if precision not in EMBEDDING_PRECISIONS:
        raise ConfigError(f"sharding.embedding_precision: {precision!r}; use {sorted(EMBEDDING_PRECISIONS)}")
    for table in embedding_tables(module):
        table.data_type = EMBEDDING_PRECISIONS[precision]


def embedding_tables(module: nn.Module) -> list[BaseEmbeddingConfig]:
    tables: list[BaseEmbeddingConfig] = []
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            tables.extend(m.embedding_bag_configs())
        elif isinstance(m, EmbeddingCollection):
            tables.extend(m.embedding_configs())
    return tables


def table_bytes(table: BaseEmbeddingConfig, bytes_per_weight: int = 4) -> int:
    return table.num_embeddings * table.embedding_dim * bytes_per_weight


def build_topology(
    cfg: ShardingConfig, world_size: int, local_world_size: int, device_type: str | None = None
) -> Topology:
    device_type = device_type or cfg.device_type()
    kwargs: dict[str, Any] = {}
    if cfg.hbm_cap_gb is not None:
        kwargs["hbm_cap"] = int(cfg.hbm_cap_gb * GB)
    if cfg.ddr_cap_gb is not None:
        kwargs["ddr_cap"] = int(cfg.ddr_cap_gb * GB)
    return Topology(
        world_size=world_size, compute_device=device_type, local_world_size=local_world_size, **kwargs
    )


def rank_capacity_bytes(topology: Topology) -> int:
    """What one rank can hold for embeddings (HBM on GPUs, DDR on CPUs)."""
    device = topology.devices[0]
    return int(device.storage.hbm if topology.compute_device == "cuda" else device.storage.ddr)


def build_constraints(
    cfg: ShardingConfig, tables: Sequence[BaseEmbeddingConfig]
) -> dict[str, ParameterConstraints]:
    names = {t.name for t in tables}
    unknown = sorted(set(cfg.tables) - names)
    if unknown:
        raise ConfigError(
            f"sharding.tables names unknown table(s) {unknown}; the model's tables are {sorted(names)}"
        )
    constraints = {}
    for t in tables:
        override = cfg.tables.get(t.name, TableSharding())
        constraints[t.name] = ParameterConstraints(
            sharding_types=list(override.sharding_types or cfg.sharding_types),
            compute_kernels=override.compute_kernels or cfg.compute_kernels,
            # pooling factor 1.0: one id per feature per sample unless the data says otherwise
        )
    return constraints


def check_fits(cfg: ShardingConfig, tables: Sequence[BaseEmbeddingConfig], topology: Topology) -> None:
    """Fail before planning when a table cannot fit any rank under its allowed sharding types."""
    cap = rank_capacity_bytes(topology)
    splitting = {"row_wise", "table_row_wise", "column_wise", "table_column_wise", "grid_shard"}
    bytes_per_weight = 2 if cfg.embedding_precision == "fp16" else 4
    for t in tables:
        allowed = set((cfg.tables.get(t.name) or TableSharding()).sharding_types or cfg.sharding_types)
        size = table_bytes(t, bytes_per_weight)
        if not (allowed & splitting) and size > cap:
            raise ConfigError(
                f"table {t.name!r} ({t.num_embeddings:,} x {t.embedding_dim} = {size / GB:.2f} GiB) "
                "is larger "
                f"than one rank's {'HBM' if topology.compute_device == 'cuda' else 'DDR'} cap "
                f"({cap / GB:.2f} GiB) and may only be sharded {sorted(allowed)}; allow row_wise "
                f"(sharding.tables.{t.name}.sharding_types: [row_wise]) or raise the per-rank cap"
            )


def make_planner(
    module: nn.Module,
    cfg: ShardingConfig,
    world_size: int,
    local_world_size: int,
    device_type: str | None = None,
    batch_size_per_rank: int | None = None,
) -> tuple[EmbeddingShardingPlanner, Topology]:
    """The planner for ``module`` on this topology; ``batch_size_per_rank`` feeds its cost model
    (lookup and all-to-all volumes; None = TorchRec's default of 512)."""
    tables = embedding_tables(module)
    topology = build_topology(cfg, world_size, local_world_size, device_type)
    constraints = build_constraints(cfg, tables)
    check_fits(cfg, tables, topology)
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, batch_size=batch_size_per_rank
    )
    return planner, topology


def plan_sharding(
    module: nn.Module,
    cfg: ShardingConfig,
    world_size: int,
    local_world_size: int,
    pg: dist.ProcessGroup | None = None,
    device_type: str | None = None,
    batch_size_per_rank: int | None = None,
) -> ShardingPlan:
    """The sharding plan; collective (all ranks agree) when a process group is given."""
    set_embedding_precision(module, cfg.embedding_precision)
    planner, _ = make_planner(module, cfg, world_size, local_world_size, device_type, batch_size_per_rank)
    shard = sharders()
    try:
        if pg is not None:
            return planner.collective_plan(module, shard, pg)
        return planner.plan(module, shard)
    except PlannerError as e:
        raise ConfigError(
            f"TorchRec's planner found no plan for {world_size} rank(s): {str(e).splitlines()[0]} "
            "(allow more sharding types in `sharding`, or raise the per-rank memory caps)"
        ) from e


def describe_plan(plan: ShardingPlan) -> list[dict[str, Any]]:
    """One row per table: sharding type, kernel, ranks and shard shapes (for logs and W&B)."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            rows.append(
                {
                    "module": module_path,
                    "table": table,
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": sorted(set(ps.ranks or [])),
                    "shards": [
                        {
                            "rank": s.placement.rank(),
                            "offsets": list(s.shard_offsets),
                            "sizes": list(s.shard_sizes),
                        }
                        for s in shards
                    ],
                }
            )
    return rows


def format_plan(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'table':<24} {'sharding':<16} {'kernel':<10} ranks"]
    for r in rows:
        lines.append(f"{r['table']:<24} {r['sharding_type']:<16} {r['compute_kernel']:<10} {r['ranks']}")
    return "\n".join(lines)
