"""DeepFM ranking as a sharded LightningModule (binary cross-entropy on click labels)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch

from models.deepfm import DeepFM, DeepFMConfig
from trainer.config import DenseOptimizerConfig, LrScheduleConfig
from trainer.metrics import BinaryCTRMetrics
from trainer.module import ShardedModule


class DeepFMModule(ShardedModule):
    pipeline_inputs = {"dense": "dense_features", "sparse": "sparse_features"}

    def __init__(
        self,
        config: DeepFMConfig,
        dense_optimizer: DenseOptimizerConfig | None = None,
        init_seed: int = 0,
        lr_schedule: LrScheduleConfig | None = None,
    ) -> None:
        super().__init__(dense_optimizer, init_seed, lr_schedule)
        self.config = config
        self.metrics = nn.ModuleDict({"val": BinaryCTRMetrics(), "test": BinaryCTRMetrics()})

    def build_model(self, device: torch.device) -> nn.Module:
        return DeepFM(self.config, device=device)

    def forward(self, batch: Batch) -> torch.Tensor:
        assert self.model is not None
        return self.model(batch.dense_features, batch.sparse_features)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch.labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch.labels))
        return loss

    def _eval_step(self, split: str, batch: Batch) -> None:
        logits = self(batch).float()
        self.metrics[split].update(logits, batch.labels)

    def _eval_epoch_end(self, split: str) -> None:
        values = self.metrics[split].compute()
        self.metrics[split].reset()
        for name, value in values.items():
            if name != "rows":
                self.log(f"{split}/{name}", value, prog_bar=name == "auc", rank_zero_only=False)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return torch.sigmoid(self(batch).float())
