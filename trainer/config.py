"""Typed run configuration: one YAML file per recipe under ``configs/``, overridable with ``--set``."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from trainer.sharding import ConfigError, ShardingConfig
from trainer.strategy import SparseOptimizerConfig


@dataclass
class DataConfig:
    path: str = "runs/data/synthetic-small"
    # how to create `path` when it does not exist yet, e.g. {kind: synthetic, preset: small}
    prepare: dict[str, Any] | None = None
    batch_size: int = 1024  # global: across all ranks
    eval_batch_size: int = 8192
    seed: int = 0
    features: list[str] | None = None  # sparse features to use (default: all of the dataset's)


@dataclass
class DenseOptimizerConfig:
    name: str = "adam"  # adam | adamw | adagrad | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    eps: float = 1e-8
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw; the SASRec paper's code uses (0.9, 0.98)
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        betas = self.betas

        def is_beta(b: object) -> bool:
            return isinstance(b, int | float) and not isinstance(b, bool) and 0.0 <= b < 1.0

        if not isinstance(betas, list | tuple) or len(betas) != 2 or not all(is_beta(b) for b in betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))


LR_DECAYS = ("constant", "cosine")


@dataclass
class LrScheduleConfig:
    """Decay of every learning rate, the dense optimizer's and the embedding tables' fused ones.

    ``cosine`` multiplies each configured rate by a factor falling from 1 at the first optimizer step
    to ``decay_to`` at the run's last (``constant`` ignores ``decay_to``). The dense optimizer's
    ``optimizer.warmup_steps`` ramp multiplies on top of it.
    """

    decay: str = "constant"  # constant | cosine
    decay_to: float = 0.0  # the final factor of the decay, in [0, 1]

    def __post_init__(self) -> None:
        if self.decay not in LR_DECAYS:
            raise ConfigError(f"lr_schedule.decay {self.decay!r}: choose {' or '.join(LR_DECAYS)}")
        value = self.decay_to
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"lr_schedule.decay_to must be a number in [0, 1], got {value!r}")
        self.decay_to = float(value)

    def factor(self, step: int, total_steps: int) -> float:
        """The factor at optimizer step ``step`` (0-based) of a run of ``total_steps`` steps."""
        if self.decay == "constant":
            return 1.0
        progress = min(max(step, 0) / max(total_steps, 1), 1.0)
        return self.decay_to + (1 - self.decay_to) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainerConfig:
    max_epochs: int = 1
    max_steps: int = -1
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true on CPU
    gradient_clip_val: float | None = None
    # dense gradients only: the fused embedding optimizers step inside every backward
    accumulate_grad_batches: int = 1
    # TorchRec's sparse-dist pipeline (input all-to-alls of batch i+1 overlap batch i's compute):
    # auto = on CUDA only, on = also on CPU (same maths, no overlap), off
    pipeline: str = "auto"
    val_check_interval: float | int = 1.0
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None
    limit_test_batches: float | int | None = None
    checkpoint_every_n_steps: int | None = None
    keep_checkpoints: int = 1  # periodic checkpoints kept (-1: all); last.ckpt links the newest
    log_every_n_steps: int = 50
    seed: int = 0
    deterministic: bool = True
    enable_progress_bar: bool = True
    test_after_fit: bool = True

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare on / off as a boolean (`--set trainer.pipeline=on` included)
        if isinstance(self.pipeline, bool):
            self.pipeline = "on" if self.pipeline else "off"


@dataclass
class LoggerConfig:
    kind: str = "csv"  # csv | wandb | none
    project: str = "funnel"
    name: str | None = None
    offline: bool | None = None  # None: follow WANDB_MODE


@dataclass
class RunConfig:
    model_name: str = "deepfm"
    model: dict[str, Any] = field(default_factory=dict)  # model-specific, see each model's config
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run_dir: str = "runs/deepfm"


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            kwargs[key] = _build(hint, value or {}, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        raw = yaml.safe_load(p.read_text()) or {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return _build(RunConfig, raw, "")


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
