"""Base LightningModule for models whose embedding tables are sharded by :class:`TorchRecStrategy`."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trainer.config import DenseOptimizerConfig
from trainer.sharding import ConfigError
from trainer.strategy import TorchRecStrategy


class ShardedModule(pl.LightningModule):
    """Builds ``build_model()`` on ``meta`` and shards it in ``configure_model``.

    Subclasses implement :meth:`build_model` and the ``*_step`` methods; the dense optimizer comes
    from ``dense_optimizer`` and covers every parameter that has no fused optimizer.
    """

    def __init__(self, dense_optimizer: DenseOptimizerConfig | None = None, init_seed: int = 0) -> None:
        super().__init__()
        self.dense_optimizer = dense_optimizer or DenseOptimizerConfig()
        self.init_seed = init_seed
        self.model: DistributedModelParallel | None = None

    @abstractmethod
    def build_model(self, device: torch.device) -> nn.Module: ...

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self.trainer.strategy
        if not isinstance(strategy, TorchRecStrategy):
            raise TypeError(f"{type(self).__name__} needs TorchRecStrategy, got {type(strategy).__name__}")
        # same seed on every rank: each rank initialises its own shards, DDP broadcasts dense weights
        torch.manual_seed(self.init_seed)
        self.model = strategy.shard(self.build_model(torch.device("meta")))

    def dense_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        assert self.model is not None
        yield from in_backward_optimizer_filter(self.model.named_parameters())

    def configure_optimizers(self) -> Any:
        cfg = self.dense_optimizer
        params = [p for _, p in self.dense_named_parameters()]
        if cfg.name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay
            )
        elif cfg.name == "adamw":
            opt = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
        elif cfg.name == "adagrad":
            opt = torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
        elif cfg.name == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            raise ConfigError(f"optimizer.name {cfg.name!r}: choose adam, adamw, adagrad or sgd")
        if not cfg.warmup_steps:
            return opt
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning prefetches a batch, so only the module knows how many were really trained on.
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_consumed"):
            loader.mark_consumed(batch_idx + 1)
