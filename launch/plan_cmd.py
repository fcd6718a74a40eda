"""``funnel plan``: TorchRec's sharding planner for a cluster you do not have (a dry run).

No GPU and no process group: the model is built on the ``meta`` device from the config, its tables
get the config's fused optimizer (whose state the planner counts), and the planner of
:mod:`trainer.sharding` (the one training uses) plans for the given topology. The report lists each
table's sharding type, compute kernel and ranks, each rank's HBM/DDR use, and the planner's perf
estimate. When no plan fits, the command says why and exits 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.overrides import add_override_argument

if TYPE_CHECKING:  # heavy imports stay inside the functions: `funnel --help` must stay fast
    from torch import nn
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from trainer.config import RunConfig

GB = 1024**3  # as in trainer.sharding (TorchRec's planner also reports GB = 2**30 bytes)
Report = dict[str, Any]


@dataclass(frozen=True)
class Cluster:
    """The topology to plan for. Memory is per rank except ``ddr_gb_per_node``."""

    world_size: int
    local_world_size: int
    compute_device: str
    hbm_gb: float | None = None
    ddr_gb_per_node: float | None = None

    def check(self) -> None:
        from trainer.sharding import ConfigError

        if self.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {self.world_size}")
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ConfigError(
                f"--local-world-size {self.local_world_size} must divide --world-size {self.world_size} "
                "(ranks per node)"
            )
        if self.compute_device not in ("cuda", "cpu"):
            raise ConfigError(f"--compute-device must be cuda or cpu, got {self.compute_device!r}")
        for flag, value in (("--hbm-gb", self.hbm_gb), ("--ddr-gb", self.ddr_gb_per_node)):
            if value is not None and value <= 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="dry-run TorchRec's sharding planner for a cluster (no GPUs needed)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--model", help="recipe name (overrides model_name in the config)")
    parser.add_argument("--world-size", type=int, default=8, help="ranks in the cluster (default 8)")
    parser.add_argument(
        "--local-world-size", type=int, default=None, help="ranks (GPUs) per node (default: min(8, world))"
    )
    parser.add_argument(
        "--hbm-gb",
        type=float,
        default=None,
        help="device memory per rank, GiB (default: sharding.hbm_cap_gb)",
    )
    parser.add_argument(
        "--ddr-gb",
        type=float,
        default=None,
        help="host memory per NODE, GiB, split evenly over its ranks (default: sharding.ddr_cap_gb per rank)",
    )
    parser.add_argument(
        "--compute-device", choices=["cuda", "cpu"], default="cuda", help="device the ranks train on"
    )
    add_override_argument(parser, "sharding.sharding_types=[table_wise]")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--torchrec-stats", action="store_true", help="also print TorchRec's own planner statistics table"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launch.doctor import _quiet_imports

    with _quiet_imports():  # fbgemm_gpu logs one line per library it loads
        from trainer.config import load_config
        from trainer.run import RECIPES  # noqa: F401  (the recipes and everything they import)
        from trainer.sharding import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
        if args.model:
            cfg.model_name = args.model
        local = args.local_world_size or min(8, args.world_size)
        cluster = Cluster(args.world_size, local, args.compute_device, args.hbm_gb, args.ddr_gb)
        report = plan_cluster(cfg, cluster)
    except ConfigError as e:
        print(f"funnel plan: {e}", file=sys.stderr)
        return 2
    report["config"] = str(args.config)
    if not args.torchrec_stats:
        report.pop("torchrec_stats")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def build_meta_model(cfg: RunConfig) -> nn.Module:
    """The config's model on ``meta``, its tables carrying the fused optimizer as in training."""
    import torch

    from trainer.run import RECIPES
    from trainer.sharding import ConfigError

    if cfg.model_name not in RECIPES:
        raise ConfigError(f"model_name {cfg.model_name!r}: choose from {sorted(RECIPES)}")
    try:
        module, _ = RECIPES[cfg.model_name](cfg)
    except FileNotFoundError as e:
        hint = " (or declare model.sparse_features and model.num_dense)" if cfg.model_name == "deepfm" else ""
        raise ConfigError(
            f"data.path: {e}. The planner sizes the tables from the prepared dataset: prepare it{hint}"
        ) from e
    build = getattr(module, "build_model", None)
    if build is None:
        raise ConfigError(f"recipe {cfg.model_name!r} has no build_model(device): nothing to plan")
    try:
        model = build(torch.device("meta"))
    except ValueError as e:  # the model config's own checks (e.g. embedding_dim)
        raise ConfigError(f"model: {e}") from e
    cfg.sparse_optimizer.attach(model, purpose="plan")  # as TorchRecStrategy.shard does
    return model


@contextmanager
def _captured_planner_stats(lines: list[str]) -> Iterator[None]:
    """Collect TorchRec's ``EmbeddingStats`` table (logged line by line) instead of printing it,
    and keep its construction warnings (Topology built directly, HeuristicalStorageReservation's
    deprecation) out of the report."""

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    stats_logger = logging.getLogger("torchrec.distributed.planner.stats")
    # Its proposers and partitioners log hundreds of INFO lines per plan.
    quiet = {
        logging.getLogger("torchrec"): logging.WARNING,
        logging.getLogger("torchrec.distributed.planner.types"): logging.ERROR,
        logging.getLogger("torchrec.distributed.planner.storage_reservations"): logging.ERROR,
    }
    saved = (stats_logger.level, stats_logger.propagate, {q: q.level for q in quiet})
    handler = Collect(logging.INFO)
    stats_logger.addHandler(handler)
    stats_logger.setLevel(logging.INFO)
    stats_logger.propagate = False
    for q, level in quiet.items():
        q.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        stats_logger.removeHandler(handler)
        stats_logger.setLevel(saved[0])
        stats_logger.propagate = saved[1]
        for q, level in saved[2].items():
            q.setLevel(level)


def _no_plan_message(error: Exception, cluster: Cluster, topology: Topology) -> str:
    device = topology.devices[0].storage
    caps = f"HBM {device.hbm / GB:.1f} GiB, DDR {device.ddr / GB:.1f} GiB per rank"
    # TorchRec's message is long; its storage lines are the part that says how far off the plan is.
    detail = []
    for line in str(error).splitlines():
        line = line.strip().rstrip(",")
        if line.count(")") > line.count("("):  # TorchRec's enclosing "2) Reduce the model size (...)"
            line = line[:-1]
        if "Global storage" in line:
            detail.append(line)
    first = str(error).splitlines()[0].strip() if str(error) else type(error).__name__
    return (
        f"no sharding plan fits {cluster.world_size} {cluster.compute_device} rank(s) "
        f"({cluster.nodes} node(s) x {cluster.local_world_size}; {caps}): {first}"
        + "".join(f"\n  {line}" for line in detail)
        + "\nAllow more sharding types or compute kernels (sharding.sharding_types, "
        "sharding.compute_kernels), raise the memory caps, or plan for more ranks."
    )


def _run_planner(
    planner: EmbeddingShardingPlanner,
    model: nn.Module,
    shard: list[Any],
    cluster: Cluster,
    topology: Topology,
) -> None:
    from torchrec.distributed.planner.types import PlannerError

    from trainer.sharding import ConfigError

    try:
        planner.plan(model, shard)
    except PlannerError as e:
        raise ConfigError(_no_plan_message(e, cluster, topology)) from e
    except Exception as e:
        # TorchRec's own no-plan diagnostics have crashed before (torchrec #4595), replacing the
        # real verdict with an unrelated AttributeError; name both so the user is not left guessing.
        raise ConfigError(
            f"TorchRec's planner failed for {cluster.world_size} {cluster.compute_device} rank(s) with "
            f"{type(e).__name__}: {e}. This is usually its no-plan report crashing (torchrec #4595): "
            "treat it as 'no plan fits' and raise the memory caps or allow more sharding types."
        ) from e


def plan_cluster(cfg: RunConfig, cluster: Cluster) -> Report:
    """Plan ``cfg``'s model for ``cluster``; raises ConfigError when no plan fits."""
    from trainer.sharding import embedding_tables, make_planner, set_embedding_precision, sharders

    cluster.check()
    sharding = copy.deepcopy(cfg.sharding)
    sharding.compute_device = cluster.compute_device
    if cluster.hbm_gb is not None:
        sharding.hbm_cap_gb = cluster.hbm_gb
    if cluster.ddr_gb_per_node is not None:
        sharding.ddr_cap_gb = cluster.ddr_gb_per_node / cluster.local_world_size
    model = build_meta_model(cfg)
    # As trainer.sharding.plan_sharding does; its planner is needed here too, for the report.
    set_embedding_precision(model, sharding.embedding_precision)
    stats_lines: list[str] = []
    started = time.perf_counter()
    with _captured_planner_stats(stats_lines):
        planner, topology = make_planner(
            model,
            sharding,
            cluster.world_size,
            cluster.local_world_size,
            cluster.compute_device,
            batch_size_per_rank=max(1, cfg.data.batch_size // cluster.world_size),
        )
        _run_planner(planner, model, sharders(), cluster, topology)
    seconds = time.perf_counter() - started
    report = describe(planner, topology, embedding_tables(model))
    report.update(
        model=cfg.model_name,
        cluster={
            "world_size": cluster.world_size,
            "local_world_size": cluster.local_world_size,
            "nodes": cluster.nodes,
            "compute_device": cluster.compute_device,
            "hbm_gb_per_rank": _gb(topology.devices[0].storage.hbm),
            "ddr_gb_per_rank": _gb(topology.devices[0].storage.ddr),
        },
        sharding_types=list(sharding.sharding_types),
        planner_seconds=round(seconds, 2),
        torchrec_stats=stats_lines,
    )
    return report


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _gb(num_bytes: float) -> float:
    return round(num_bytes / GB, 3)


def _ms(value: float) -> float:
    return round(value, 4)


def _storage_reservation(planner: EmbeddingShardingPlanner, topology: Topology) -> tuple[float, Any, Any]:
    """(reserved HBM fraction, dense, KJT) per rank, as TorchRec's own stats compute them."""
    from torchrec.distributed.planner.types import Storage

    try:
        from torchrec.distributed.planner.stats import _compute_storage

        return _compute_storage(planner._storage_reservation, topology)
    except (ImportError, AttributeError):  # private helpers: absent in another TorchRec version
        return 0.0, Storage(0, 0, 0), Storage(0, 0, 0)


def describe(planner: EmbeddingShardingPlanner, topology: Topology, tables: list[Any]) -> Report:
    """Tables, ranks and perf of the planner's chosen plan (its ``ShardingOption`` list)."""
    from torchrec.distributed.planner.types import Perf, Storage

    options = planner.get_selected_options()
    sizes = {t.name: t for t in tables}
    world = topology.world_size
    zero = Perf(fwd_compute=0, fwd_comms=0, bwd_compute=0, bwd_comms=0)
    rank_storage = [Storage(0, 0, 0) for _ in range(world)]
    rank_perf = [copy.copy(zero) for _ in range(world)]
    table_rows = []
    for so in options:
        for shard in so.shards:
            assert shard.rank is not None and shard.storage is not None and shard.perf is not None
            rank_storage[shard.rank] += shard.storage
            rank_perf[shard.rank] += shard.perf
        table = sizes.get(so.name)
        rows, dim = (table.num_embeddings, table.embedding_dim) if table else tuple(so.tensor.shape)
        storage = so.total_storage
        table_rows.append(
            {
                "table": so.name,
                "rows": int(rows),
                "dim": int(dim),
                "weights_gb": _gb(rows * dim * so.tensor.element_size()),
                "sharding_type": so.sharding_type,
                "compute_kernel": so.compute_kernel,
                "ranks": sorted({int(s.rank) for s in so.shards if s.rank is not None}),
                "shards": len(so.shards),
                "hbm_gb": _gb(storage.hbm),
                "ddr_gb": _gb(storage.ddr),
                "perf_ms": _ms(so.total_perf),
            }
        )
    reserved_fraction, dense, kjt = _storage_reservation(planner, topology)
    ranks = []
    for r in range(world):
        cap = topology.devices[r].storage
        hbm = rank_storage[r].hbm + dense.hbm + kjt.hbm
        ddr = rank_storage[r].ddr + dense.ddr + kjt.ddr
        p = rank_perf[r]
        ranks.append(
            {
                "rank": r,
                "hbm_gb": _gb(hbm),
                "hbm_cap_gb": _gb(cap.hbm),
                "ddr_gb": _gb(ddr),
                "ddr_cap_gb": _gb(cap.ddr),
                "perf_ms": _ms(p.total),
                "fwd_compute_ms": _ms(p.fwd_compute),
                "fwd_comms_ms": _ms(p.fwd_comms),
                "bwd_compute_ms": _ms(p.bwd_compute),
                "bwd_comms_ms": _ms(p.bwd_comms),
            }
        )
    totals = [r["perf_ms"] for r in ranks]
    busiest = max(totals) if totals else 0.0
    estimate: dict[str, Any] = {
        # What TorchRec's default perf model (NoopPerfModel) rates a plan by, and so what it minimised.
        "max_rank_perf_ms": _ms(busiest),
        "max_rank_perf_ranks": [r["rank"] for r in ranks if r["perf_ms"] == busiest],
        "mean_rank_perf_ms": _ms(sum(totals) / len(totals)) if totals else 0.0,
    }
    try:
        from torchrec.distributed.planner.stats import _calculate_critical_path

        path = _calculate_critical_path(options)
        estimate["critical_path_ms"] = {
            "comms": _ms(path.comms_estimate),
            "compute": _ms(path.comp_estimate),
            "total": _ms(path.comms_estimate + path.comp_estimate),
        }
    except (ImportError, AttributeError):  # private helper: absent in another TorchRec version
        pass
    return {
        "batch_size_per_rank": int(getattr(planner, "_batch_size", 0)),
        "proposals": getattr(planner, "_num_proposals", None),
        "tables": table_rows,
        "ranks": ranks,
        "reservation": {
            "hbm_fraction": reserved_fraction,
            "dense_hbm_gb": _gb(dense.hbm),
            "dense_ddr_gb": _gb(dense.ddr),
            "kjt_hbm_gb": _gb(kjt.hbm),
            "kjt_ddr_gb": _gb(kjt.ddr),
        },
        "totals": {
            "tables": len(table_rows),
            "rows": sum(t["rows"] for t in table_rows),
            "weights_gb": round(sum(t["weights_gb"] for t in table_rows), 3),
            "hbm_gb": round(sum(r["hbm_gb"] for r in ranks), 3),
            "ddr_gb": round(sum(r["ddr_gb"] for r in ranks), 3),
        },
        "estimate": estimate,
    }


def compress_ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


RankGroup = tuple[list[int], dict[str, Any]]


def _rank_groups(ranks: list[dict[str, Any]], keys: tuple[str, ...]) -> list[RankGroup]:
    """Consecutive ranks with identical figures share a row: 64 lines of the same numbers say little."""
    groups: list[RankGroup] = []
    for r in ranks:
        if groups and all(groups[-1][1][k] == r[k] for k in keys):
            groups[-1][0].append(r["rank"])
        else:
            groups.append(([r["rank"]], r))
    return groups


def format_report(report: Report) -> str:
    c = report["cluster"]
    t = report["totals"]
    lines = [
        f"funnel plan: {report.get('config', '')} (model {report['model']})",
        f"cluster: {c['world_size']} {c['compute_device']} ranks = {c['nodes']} node(s) x "
        f"{c['local_world_size']}; per rank HBM {c['hbm_gb_per_rank']:g} GiB, "
        f"DDR {c['ddr_gb_per_rank']:g} GiB",
        f"model: {t['tables']} tables, {t['rows']:,} rows, {t['weights_gb']:.2f} GiB of weights; "
        f"sharding types allowed {report['sharding_types']}",
        "",
        f"{'table':<16} {'rows':>12} {'dim':>4} {'GiB':>8}  {'sharding':<15} {'kernel':<18} "
        f"{'ranks':<12} {'HBM GiB':>8} {'DDR GiB':>8} {'perf ms':>8}",
    ]
    for row in report["tables"]:
        lines.append(
            f"{row['table']:<16} {row['rows']:>12,} {row['dim']:>4} {row['weights_gb']:>8.3f}  "
            f"{row['sharding_type']:<15} {row['compute_kernel']:<18} {compress_ranks(row['ranks']):<12} "
            f"{row['hbm_gb']:>8.3f} {row['ddr_gb']:>8.3f} {row['perf_ms']:>8.3f}"
        )
    res = report["reservation"]
    lines += [
        "",
        "per rank (shards + TorchRec's per-rank reservation for dense weights "
        f"{res['dense_hbm_gb'] + res['dense_ddr_gb']:.3f} GiB and input KJTs "
        f"{res['kjt_hbm_gb'] + res['kjt_ddr_gb']:.3f} GiB; it also holds back "
        f"{res['hbm_fraction']:.0%} of HBM):",
        f"{'ranks':<12} {'HBM GiB':>9} {'of cap':>7} {'DDR GiB':>9} {'of cap':>7} {'perf ms':>8}  "
        "(fwd compute, fwd comms, bwd compute, bwd comms)",
    ]
    keys = ("hbm_gb", "ddr_gb", "perf_ms", "fwd_compute_ms", "fwd_comms_ms", "bwd_compute_ms", "bwd_comms_ms")
    for members, r in _rank_groups(report["ranks"], keys):
        hbm_share = r["hbm_gb"] / r["hbm_cap_gb"] if r["hbm_cap_gb"] else 0.0
        ddr_share = r["ddr_gb"] / r["ddr_cap_gb"] if r["ddr_cap_gb"] else 0.0
        lines.append(
            f"{compress_ranks(members):<12} {r['hbm_gb']:>9.3f} {hbm_share:>7.1%} {r['ddr_gb']:>9.3f} "
            f"{ddr_share:>7.1%} {r['perf_ms']:>8.3f}  ({r['fwd_compute_ms']:.3f}, {r['fwd_comms_ms']:.3f}, "
            f"{r['bwd_compute_ms']:.3f}, {r['bwd_comms_ms']:.3f})"
        )
    e = report["estimate"]
    lines += [
        "",
        "perf estimate (TorchRec's model of one iteration's embedding work at "
        f"{report['batch_size_per_rank']} samples per rank):",
        f"  busiest rank {e['max_rank_perf_ms']:.3f} ms on ranks {compress_ranks(e['max_rank_perf_ranks'])} "
        f"(the planner minimises this); mean rank {e['mean_rank_perf_ms']:.3f} ms",
    ]
    if "critical_path_ms" in e:
        cp = e["critical_path_ms"]
        lines.append(
            f"  critical path {cp['total']:.3f} ms = comms {cp['comms']:.3f} + compute {cp['compute']:.3f}"
        )
    lines.append(
        f"  total HBM {t['hbm_gb']:.2f} GiB, DDR {t['ddr_gb']:.2f} GiB over all ranks; "
        f"planned in {report['planner_seconds']} s ({report['proposals']} proposals)"
    )
    if report.get("torchrec_stats"):
        lines += ["", "TorchRec planner statistics:", *report["torchrec_stats"]]
    return "\n".join(lines)
