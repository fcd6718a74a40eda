"""Callbacks: throughput, the sharding plan report, and fault injection for restart tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from trainer.sharding import describe_plan
from trainer.strategy import TorchRecStrategy

log = logging.getLogger(__name__)


def batch_rows(batch: Any) -> int:
    labels = getattr(batch, "labels", None)
    if isinstance(labels, torch.Tensor):
        return int(labels.shape[0])
    return int(getattr(batch, "batch_size", 0))


class Throughput(pl.Callback):
    """Global samples/s (all ranks), on the progress bar and in the logs."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._t0 = 0.0
        self._rows = 0
        self._steps = 0
        self.total_rows = 0
        self.train_seconds = 0.0
        self.last_rate = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._steps == 0:
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch is None:  # the sparse-dist pipeline fetches batches itself
            batch = getattr(pl_module, "last_train_batch", None)
        rows = batch_rows(batch) * trainer.world_size
        self._rows += rows
        self.total_rows += rows
        self._steps += 1
        if self._steps >= self.window:
            elapsed = time.perf_counter() - self._t0
            self.train_seconds += elapsed
            self.last_rate = self._rows / max(elapsed, 1e-9)
            # batch_size only because Lightning asks for it when training_step takes dataloader_iter
            pl_module.log(
                "train/samples_per_sec", self.last_rate, prog_bar=True, rank_zero_only=True, batch_size=1
            )
            self._rows = 0
            self._steps = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps:
            self.train_seconds += time.perf_counter() - self._t0
            self._rows = 0
            self._steps = 0

    @property
    def average_rate(self) -> float:
        return self.total_rows / self.train_seconds if self.train_seconds else 0.0


class ShardingReport(pl.Callback):
    """Writes the plan (table -> sharding type -> ranks) and embedding bytes per rank at fit start."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []
        self.bytes_per_rank: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer)

    def report(self, trainer: pl.Trainer) -> None:
        """Runs once, after the model is sharded (a collective: every rank must call it)."""
        strategy = trainer.strategy
        if not isinstance(strategy, TorchRecStrategy) or self.rows:
            return
        for plan in strategy.plans.values():
            self.rows.extend(describe_plan(plan))
        local = 0
        for _, dmp in strategy.sharded_modules():
            for value in dmp.state_dict().values():
                shards = getattr(value, "local_shards", None)
                if callable(shards):
                    local += sum(s.tensor.numel() * s.tensor.element_size() for s in shards())
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(trainer.world_size)]
        mine = torch.tensor([local], dtype=torch.int64)
        if dist.is_initialized() and trainer.world_size > 1:
            if strategy.root_device.type == "cuda":
                mine = mine.cuda()
                sizes = [s.cuda() for s in sizes]
            dist.all_gather(sizes, mine)
        else:
            sizes = [mine]
        self.bytes_per_rank = [int(s.item()) for s in sizes]
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            report = {"tables": self.rows, "embedding_bytes_per_rank": self.bytes_per_rank}
            (self.run_dir / "sharding_plan.json").write_text(json.dumps(report, indent=2))
            for logger in trainer.loggers:
                if hasattr(logger, "log_table"):
                    logger.log_table(
                        key="sharding_plan",
                        columns=["table", "sharding_type", "compute_kernel", "ranks"],
                        data=[
                            [r["table"], r["sharding_type"], r["compute_kernel"], str(r["ranks"])]
                            for r in self.rows
                        ],
                    )
                logger.log_metrics(
                    {f"embedding_mb/rank{i}": b / 2**20 for i, b in enumerate(self.bytes_per_rank)}, step=0
                )


class FaultInjection(pl.Callback):
    """SIGKILLs this process at a given global step on the first attempt (restart tests).

    Enabled by ``FUNNEL_KILL_AT_STEP`` (and optionally ``FUNNEL_KILL_RANK``, default 0); torchrun's
    ``TORCHELASTIC_RESTART_COUNT`` keeps the restarted attempt alive.
    """

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        step = os.environ.get("FUNNEL_KILL_AT_STEP")
        if step is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            return None
        return cls(int(step), int(os.environ.get("FUNNEL_KILL_RANK", "0")))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            log.warning("fault injection: SIGKILL at global step %d on rank %d", self.step, self.rank)
            os.kill(os.getpid(), signal.SIGKILL)
