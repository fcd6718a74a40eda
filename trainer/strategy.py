"""A Lightning strategy that shards embedding tables with TorchRec.

Why not ``DDPStrategy``: TorchRec's ``DistributedModelParallel`` (DMP) already wraps the dense part
of the model in DDP; wrapping it again would all-reduce dense gradients twice and try to all-reduce
sharded tables. This strategy owns the process group, the sharding plan and DMP, and checkpoints
with ``torch.distributed.checkpoint`` so every rank writes only its own shards.

The LightningModule builds its model on the ``meta`` device and hands it to :meth:`shard` inside
``configure_model``; the planner then materialises only each rank's shards. Embedding tables are
trained by FBGEMM fused optimizers applied during backward; the dense parameters by the optimizer of
``configure_optimizers`` (so Lightning's clipping, schedulers and accumulation apply to them).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning_fabric.plugins.environments import ClusterEnvironment
from lightning_fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from trainer.sharding import (
    ConfigError,
    ShardingConfig,
    describe_plan,
    exact_cpu_unpooled_lookups,
    format_plan,
    plan_sharding,
    sharders,
)

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.pt"


@dataclass
class SparseOptimizerConfig:
    """The fused (in-backward) optimizer of the embedding tables."""

    name: str = "rowwise_adagrad"  # sgd | adagrad | rowwise_adagrad | adam
    lr: float = 0.05
    eps: float = 1e-8
    weight_decay: float = 0.0

    def optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        from torchrec.optim import RowWiseAdagrad

        classes: dict[str, type[torch.optim.Optimizer]] = {
            "sgd": torch.optim.SGD,
            "adagrad": torch.optim.Adagrad,
            "rowwise_adagrad": RowWiseAdagrad,
            "adam": torch.optim.Adam,
        }
        if self.name not in classes:
            raise ConfigError(f"sparse_optimizer.name {self.name!r}: choose from {sorted(classes)}")
        kwargs: dict[str, Any] = {"lr": self.lr}
        if self.name != "sgd":
            kwargs["eps"] = self.eps
        if self.weight_decay:
            kwargs["weight_decay"] = self.weight_decay
        return classes[self.name], kwargs

    def check(self, device_type: str) -> None:
        """Refuse settings FBGEMM's kernels on ``device_type`` would silently not apply."""
        if self.name == "adam" and device_type == "cpu":
            raise ConfigError(
                "sparse_optimizer.name adam: FBGEMM's CPU kernels have no fused Adam; on CPU use sgd, "
                "adagrad or rowwise_adagrad (adam works on CUDA), or make the table data-parallel "
                "(sharding.tables.NAME.sharding_types: [data_parallel]): the dense optimizer, which can "
                "be Adam, then trains it"
            )
        if self.weight_decay and (device_type == "cpu" or self.name != "rowwise_adagrad"):
            # measured on fbgemm-gpu-cpu 1.9.0: every CPU optimizer updates the rows exactly as with
            # weight_decay 0, whatever the weight_decay_mode; of the CUDA kernels offered here only
            # row-wise Adagrad reads weight_decay_mode
            why = "FBGEMM's CPU kernels ignore it" if device_type == "cpu" else f"{self.name} has none"
            raise ConfigError(
                f"sparse_optimizer.weight_decay {self.weight_decay}: the tables would not decay ({why}); "
                "it applies with sparse_optimizer.name rowwise_adagrad on CUDA"
            )

    def attach(self, module: nn.Module, purpose: str = "shard") -> None:
        """Give every TorchRec table of ``module`` this fused in-backward optimizer.

        Before planning: the optimizer's state is part of the storage the planner places.
        """
        params = [
            p
            for m in module.modules()
            if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)
            for p in m.parameters()
        ]
        if not params:
            raise ConfigError(f"{type(module).__name__} has no TorchRec embedding tables to {purpose}")
        optimizer_class, optimizer_kwargs = self.optimizer()
        apply_optimizer_in_backward(optimizer_class, params, optimizer_kwargs)

    def fused_params(self) -> dict[str, Any]:
        """FBGEMM kernel settings the optimizer kwargs cannot carry (given to the sharders)."""
        if not self.weight_decay:
            return {}
        from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

        return {"weight_decay_mode": WeightDecayMode.L2}  # torch's coupled decay: grad += wd * w


class TorchRecStrategy(ParallelStrategy):
    """Lightning strategy for models whose embedding tables TorchRec shards across ranks."""

    strategy_name = "torchrec"

    def __init__(
        self,
        sharding: ShardingConfig | None = None,
        sparse_optimizer: SparseOptimizerConfig | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta = timedelta(minutes=30),
        pipeline: str = "auto",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.sharding = sharding or ShardingConfig()
        self.sparse_optimizer = sparse_optimizer or SparseOptimizerConfig()
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._num_nodes = 1
        self.plans: dict[str, ShardingPlan] = {}
        if pipeline not in ("auto", "on", "off"):
            raise ConfigError(f"trainer.pipeline {pipeline!r}: choose auto, on or off")
        self.pipeline = pipeline
        self.batch_size = batch_size  # global training batch, for the planner's cost model

    def use_pipeline(self) -> bool:
        """Whether training overlaps input distribution with compute (``trainer.pipeline``).

        ``auto`` pipelines on CUDA, where the stages run on separate streams; on CPU there is no
        overlap to gain, so ``auto`` keeps the plain loop there (``on`` forces it, for tests).
        """
        if self.pipeline == "auto":
            return self.root_device.type == "cuda"
        return self.pipeline == "on"

    # -- topology ------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 1

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def local_world_size(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.num_processes))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def process_group_backend(self) -> str:
        if self._process_group_backend:
            return self._process_group_backend
        return "nccl" if self.root_device.type == "cuda" else "gloo"

    def setup_environment(self) -> None:
        if self.world_size > 1 and not os.environ.get("TORCHELASTIC_RUN_ID") and "RANK" not in os.environ:
            raise RuntimeError(
                f"{self.world_size} processes requested but this process was not started by torchrun: "
                "use `funnel train ... --nproc-per-node N` or `torchrun --nproc-per-node N -m trainer ...`"
            )
        super().setup_environment()
        self.set_world_ranks()
        assert self.cluster_environment is not None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not dist.is_initialized():
            dist.init_process_group(
                self.process_group_backend(),
                store=_attempt_store(self._timeout),
                rank=self.global_rank,
                world_size=self.world_size,
                timeout=self._timeout,
            )
        else:
            _init_dist_connection(
                self.cluster_environment, self.process_group_backend(), timeout=self._timeout
            )
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)

    # -- sharding ------------------------------------------------------------------------------
    def shard(self, module: nn.Module, name: str = "model") -> DistributedModelParallel:
        """Plan and shard ``module`` (built on ``meta``); returns the DMP-wrapped module.

        All ranks must call this together (the planner agrees on one plan collectively).
        """
        self.sparse_optimizer.attach(module)
        pg = dist.group.WORLD
        assert pg is not None, "process group not initialised: call setup_environment() first"
        plan = plan_sharding(
            module,
            self.sharding,
            world_size=self.world_size,
            local_world_size=self.local_world_size,
            pg=pg,
            device_type=self.root_device.type,
            batch_size_per_rank=self.batch_size // self.world_size if self.batch_size else None,
        )
        self.plans[name] = plan
        if self.is_global_zero:
            log.info("sharding plan for %s:\n%s", name, format_plan(describe_plan(plan)))
        dmp = ShardedModel(
            module,
            env=ShardingEnv.from_process_group(pg),
            device=self.root_device,
            plan=plan,
            sharders=sharders(self.sparse_optimizer.fused_params()),
        )
        exact_cpu_unpooled_lookups(dmp)
        return dmp

    def sharded_modules(self) -> Iterator[tuple[str, DistributedModelParallel]]:
        assert self.lightning_module is not None
        for name, m in self.lightning_module.named_modules():
            if isinstance(m, DistributedModelParallel):
                yield name, m

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        if not any(True for _ in self.sharded_modules()):
            raise RuntimeError(
                "TorchRecStrategy: the LightningModule has no sharded model; build it on the meta device "
                "and call `self.trainer.strategy.shard(model)` in `configure_model`"
            )
        # DMP has already placed every parameter on this rank's device; moving the LightningModule
        # again would try to move sharded tensors.
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def model_to_device(self) -> None:
        pass

    # -- collectives ---------------------------------------------------------------------------
    def barrier(self, name: str | None = None) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    def all_gather(
        self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False
    ) -> torch.Tensor:
        return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # the fused optimizers only exist once the model is sharded and the optimizers are set up
        return True

    def _sparse_optimizer_state(self) -> dict[str, Any]:
        return {name: dmp.fused_optimizer.state_dict() for name, dmp in self.sharded_modules()}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write a sharded checkpoint directory, all ranks together.

        ``<path>/`` holds the DCP files (model tables and dense weights, fused optimizer state) and
        ``trainer_state.pt`` (Lightning's loops, callbacks and dense optimizer, written by rank 0).
        The directory is written under a temporary name and renamed when complete, so a job killed
        mid-save never leaves a checkpoint that looks valid.
        """
        if storage_options is not None:
            raise TypeError("TorchRecStrategy.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        state = {
            "state_dict": checkpoint.pop("state_dict"),
            "sparse_optimizer": self._sparse_optimizer_state(),
        }
        dcp.save(state, checkpoint_id=tmp)
        if self.is_global_zero:
            torch.save(checkpoint, tmp / TRAINER_STATE_FILE)
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
            os.rename(tmp, path)
        self.barrier()

    def remove_checkpoint(self, filepath: str | os.PathLike[str]) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)

    def load_checkpoint(
        self, checkpoint_path: str | os.PathLike[str], weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a sharded checkpoint written by any world size (DCP reshards on load)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a funnel checkpoint (no {TRAINER_STATE_FILE})")
        assert self.lightning_module is not None
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        state: dict[str, Any] = {"state_dict": self.lightning_module.state_dict()}
        if fitting:
            state["sparse_optimizer"] = self._sparse_optimizer_state()
        dcp.load(state, checkpoint_id=path)
        load_module_state(self.lightning_module, state["state_dict"])
        if fitting:
            for name, dmp in self.sharded_modules():
                dmp.fused_optimizer.load_state_dict(state["sparse_optimizer"][name])
        # Our own trainer state (loops, callbacks, dense optimizer): Lightning objects, not tensors only.
        return torch.load(path / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        # done in load_checkpoint, where the sharded tensors are read in place
        pass


class ShardedModel(DistributedModelParallel):
    """TorchRec's DMP with state-dict keys that do not depend on how its dense part is wrapped.

    TorchRec 1.9's ``state_dict`` strips DDP's ``module.`` and then prefixes *every* key of the
    destination: a model whose only parameters are sharded tables (no DDP wrapper, e.g. a two-tower
    with ``projection: false``) got its prefix twice (``model.model.sparse_arch...``), so its
    checkpoints could not be read by the plain-module loaders. Here the wrapped module's own keys are
    collected apart, stripped of DDP's prefix, and added under ``prefix`` alone.
    """

    def state_dict(  # type: ignore[override]
        self, destination: dict[str, Any] | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        inner = self._dmp_wrapped_module
        own = inner.state_dict(keep_vars=keep_vars)
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(own, "module.")
        out: dict[str, Any] = destination if destination is not None else {}
        for key, value in own.items():
            out[prefix + key] = value
        return out


def _attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's agent store, namespaced by restart attempt.

    The agent keeps one store across elastic restarts, and process-group names are deterministic,
    so without a per-attempt prefix the restarted workers read the dead workers' addresses for
    groups created after the default one (TorchRec creates several) and fail to connect.
    """
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"funnel/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def load_module_state(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """``module.load_state_dict`` that also reaches into DMP-wrapped children.

    ``nn.Module.load_state_dict`` recurses through DMP's internal wrapper names
    (``_dmp_wrapped_module.module``) that its ``state_dict`` hides, so each DMP is loaded through its
    own ``load_state_dict`` and the rest of the module normally.
    """
    dmp_names = [n for n, m in module.named_modules() if isinstance(m, DistributedModelParallel)]
    rest = dict(state_dict)
    for name in dmp_names:
        prefix = f"{name}."
        sub = {k[len(prefix) :]: rest.pop(k) for k in list(rest) if k.startswith(prefix)}
        module.get_submodule(name).load_state_dict(sub)
    if rest:
        missing, unexpected = module.load_state_dict(rest, strict=False)
        if unexpected:
            raise KeyError(f"unexpected keys in checkpoint: {unexpected}")
