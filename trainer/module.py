"""Base LightningModule for models whose embedding tables are sharded by :class:`TorchRecStrategy`."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trainer.config import DenseOptimizerConfig, LrScheduleConfig
from trainer.pipeline import SparseDistPipeline
from trainer.sharding import ConfigError
from trainer.strategy import TorchRecStrategy


class ShardedModule(pl.LightningModule):
    """Builds ``build_model()`` on ``meta`` and shards it in ``configure_model``.

    Subclasses implement :meth:`build_model` and the ``*_step`` methods; the dense optimizer comes
    from ``dense_optimizer`` and covers every parameter that has no fused optimizer.

    ``lr_schedule`` decays every learning rate by :meth:`lr_factor`: the dense optimizer's through
    its LambdaLR (times the warmup ramp), the tables' fused optimizers, which step inside backward
    where no Lightning scheduler reaches, by setting their rate before each training batch.

    When the strategy pipelines (``trainer.pipeline``), ``training_step`` is replaced by one that
    takes Lightning's ``dataloader_iter`` and runs the subclass's ``training_step`` inside
    :class:`~trainer.pipeline.SparseDistPipeline`; the subclass opts in by declaring
    :attr:`pipeline_inputs`.
    """

    #: ``{parameter of the sharded model's forward: attribute of the training batch}``. Declares that
    #: ``training_step`` calls ``self.model`` with exactly these batch fields, so the pipeline may
    #: start a batch's input distribution one step early. ``None``: never pipelined.
    pipeline_inputs: ClassVar[dict[str, str] | None] = None

    def __init__(
        self,
        dense_optimizer: DenseOptimizerConfig | None = None,
        init_seed: int = 0,
        lr_schedule: LrScheduleConfig | None = None,
    ) -> None:
        super().__init__()
        self.dense_optimizer = dense_optimizer or DenseOptimizerConfig()
        self.lr_schedule = lr_schedule or LrScheduleConfig()
        self.init_seed = init_seed
        # Registered first (empty until configure_model): DistributedModelParallel.state_dict re-prefixes
        # every key already in the shared destination with its own name, so the state of a child
        # registered before it would be saved as "model.<child>.*" and not load back.
        self.register_module("model", None)
        self.model: DistributedModelParallel | None
        self._pipeline: SparseDistPipeline | None = None
        self.pipelined = False  # whether training runs through SparseDistPipeline (set when sharded)
        self.last_train_batch: Any = None

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
        if not strategy.use_pipeline():
            return
        if self.pipeline_inputs is None:
            if strategy.pipeline == "on":
                raise ConfigError(
                    f"trainer.pipeline=on but {type(self).__name__} builds its sharded inputs inside the "
                    "model, so TorchRec cannot distribute them ahead: set trainer.pipeline to auto or off"
                )
            return
        # Lightning picks its data fetcher from this signature: the pipeline fetches ahead itself
        self.training_step = self._pipelined_training_step  # type: ignore[method-assign]
        self.pipelined = True

    def dense_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        assert self.model is not None
        yield from in_backward_optimizer_filter(self.model.named_parameters())

    def configure_optimizers(self) -> Any:
        cfg = self.dense_optimizer
        params = [p for _, p in self.dense_named_parameters()]
        if not params:
            return None  # every parameter is a table with its fused optimizer (two-tower, projection off)
        if cfg.name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
            )
        elif cfg.name == "adamw":
            opt = torch.optim.AdamW(
                params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
            )
        elif cfg.name == "adagrad":
            opt = torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
        elif cfg.name == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            raise ConfigError(f"optimizer.name {cfg.name!r}: choose adam, adamw, adagrad or sgd")
        warmup = cfg.warmup_steps
        if not warmup and self.lr_schedule.decay == "constant":
            return opt

        def factor(step: int) -> float:
            return (min(1.0, (step + 1) / warmup) if warmup else 1.0) * self.lr_factor(step)

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation: Lightning's validation and test hooks, one implementation per split ------------
    def _eval_start(self, split: str) -> None:
        """Before the first batch of a validation or test epoch (``split`` is ``val`` or ``test``)."""

    def _eval_step(self, split: str, batch: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not evaluate")

    def _eval_epoch_end(self, split: str) -> None:
        """After the last batch: compute, log and reset the split's metrics."""

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # -- the learning-rate schedule ---------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """``lr_schedule``'s factor at optimizer step ``step`` of this run (warmup not included)."""
        if self.lr_schedule.decay == "constant":
            return 1.0
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            # Lightning's estimate is inf (max_epochs -1) or max_steps (-1 when unset) for a loader
            # of unknown length: the curve would have no end to decay towards
            raise ConfigError(
                f"lr_schedule.decay {self.lr_schedule.decay}: the run's number of optimizer steps is "
                f"unknown (Lightning estimates {total}); set trainer.max_steps or trainer.max_epochs"
            )
        return self.lr_schedule.factor(step, int(total))

    def _apply_lr_schedule(self) -> None:
        if self.lr_schedule.decay == "constant":
            return
        # From the optimizer step, not a counter of our own, so a resumed run continues the curve.
        factor = self.lr_factor(self.global_step)
        self.log("train/lr_factor", factor, batch_size=1)
        for _, dmp in self.trainer.strategy.sharded_modules():  # type: ignore[attr-defined]
            for group in dmp.fused_optimizer.param_groups:
                # the configured rate: the fused optimizers' param_groups are not checkpointed, so
                # after a resume they hold it again
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
            dmp.fused_optimizer.zero_grad()  # what pushes param_groups' lr into the FBGEMM kernels

    # -- the pipelined training step --------------------------------------------------------------
    def _epoch_batches_started(self) -> int:
        """Batches of this epoch Lightning has started, the current one included (restored on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _pipelined_training_step(self, dataloader_iter: Iterator[Any]) -> torch.Tensor:
        # Lightning's iterator is left alone: it would end the epoch as soon as the pipeline had
        # fetched the last batch, two steps before that batch is trained. The pipeline reads the
        # loader from the first untrained batch instead, and Lightning ends the epoch by its count.
        del dataloader_iter
        if self._pipeline is None:
            loader = self.trainer.train_dataloader
            if not hasattr(loader, "iter_from"):
                raise TypeError(
                    f"trainer.pipeline needs a GlobalBatches train loader, got {type(loader).__name__}"
                )
            assert self.model is not None and self.pipeline_inputs is not None
            step = type(self).training_step
            self._pipeline = SparseDistPipeline(
                self.model,
                self.device,
                loader.iter_from(self._epoch_batches_started() - 1),
                self.pipeline_inputs,
                lambda batch: step(self, batch, self._epoch_batches_started() - 1),
            )
        loss = self._pipeline.step()
        self.last_train_batch = self._pipeline.current_batch
        # Lightning takes the next step's batch_idx from its fetcher, which never fetches here;
        # the automatic optimization decides when to zero gradients under accumulate_grad_batches
        # from it, so keep it true (guarded by tests/test_pipeline.py).
        fetcher = getattr(self.trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            fetcher._batch_idx = self._epoch_batches_started()
        return loss

    def close_pipeline(self) -> None:
        """Drop the pipeline (its fetched-ahead batches are re-read when training continues)."""
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def on_validation_start(self) -> None:
        self.close_pipeline()  # evaluation calls the model's own forwards

    def on_test_start(self) -> None:
        self.close_pipeline()

    def on_predict_start(self) -> None:
        self.close_pipeline()

    def on_train_epoch_end(self) -> None:
        self.close_pipeline()

    def on_train_end(self) -> None:
        self.close_pipeline()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning (and the pipeline) fetch ahead, so only the loop's count says how many batches
        # were really trained on; ``batch_idx`` is not maintained when the pipeline fetches.
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_consumed"):
            loader.mark_consumed(self._epoch_batches_started())
        # Lightning calls this hook before the pipelined step too, and the pipeline only forwards:
        # the fused update of this batch runs in Lightning's backward, after the rate is set here.
        self._apply_lr_schedule()
