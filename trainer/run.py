"""Training entry point: ``torchrun ... -m trainer --model deepfm --config configs/deepfm_synthetic.yaml``.

Reads a typed config, prepares the dataset if the config says how and it is missing, builds the
LightningModule, data module, :class:`TorchRecStrategy`, loggers and callbacks, fits, tests, and
prints a one-screen summary (also written to ``<run_dir>/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

from trainer.callbacks import FaultInjection, ShardingReport, Throughput
from trainer.config import RunConfig, load_config, to_dict
from trainer.overrides import add_override_argument
from trainer.sharding import ConfigError, format_plan
from trainer.strategy import TorchRecStrategy, load_module_state

log = logging.getLogger("funnel.train")


# -- recipes: model name -> (LightningModule, LightningDataModule) ------------------------------
def _deepfm(cfg: RunConfig) -> tuple[pl.LightningModule, pl.LightningDataModule | None]:
    from data.ctr import CTRDataModule
    from models.deepfm import DeepFMConfig
    from trainer.ranking import DeepFMModule

    model_kwargs = dict(cfg.model)
    # A cluster config may declare its table sizes so that `funnel plan` can size a model whose
    # dataset is not on this machine; once the dataset exists, its vocabularies decide.
    declared = model_kwargs.pop("sparse_features", None)
    declared_dense = model_kwargs.pop("num_dense", None)
    dm: CTRDataModule | None = None
    if declared is not None and not (Path(cfg.data.path) / "meta.json").is_file():
        sparse, num_dense = _declared_shapes(declared, declared_dense, cfg.data.path)
        multi_valued = list(model_kwargs.pop("multi_valued", []))
    else:
        try:
            dm = CTRDataModule(
                cfg.data.path, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.seed, cfg.data.features
            )
        except ValueError as e:  # unknown feature names, wrong table layout
            raise ConfigError(f"data: {e}") from e
        schema = dm.schema
        sparse = {f.name: f.vocab for f in schema.sparse}
        num_dense = len(schema.dense)
        multi_valued = [f.name for f in schema.sparse if f.multi_valued]
        if declared is not None and declared != sparse:
            log.warning("model.sparse_features differs from %s; the dataset's vocabularies are used", dm.path)
    try:
        model_cfg = DeepFMConfig(
            sparse_features=sparse, num_dense=num_dense, multi_valued=multi_valued, **model_kwargs
        )
    except TypeError as e:
        raise ConfigError(f"model: {e}") from e
    module = DeepFMModule(model_cfg, cfg.optimizer, init_seed=cfg.trainer.seed, lr_schedule=cfg.lr_schedule)
    return module, dm


def _declared_shapes(declared: Any, num_dense: Any, data_path: str) -> tuple[dict[str, int], int]:
    """``model.sparse_features: {name: rows}`` and ``model.num_dense``, checked."""
    if not isinstance(declared, dict) or not declared:
        raise ConfigError(f"model.sparse_features: expected a mapping feature -> rows, got {declared!r}")
    bad = {k: v for k, v in declared.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ConfigError(f"model.sparse_features: rows must be positive integers, got {bad}")
    if isinstance(num_dense, bool) or not isinstance(num_dense, int) or num_dense < 0:
        raise ConfigError(
            f"model.num_dense: a count >= 0 is needed with model.sparse_features while {data_path} "
            f"is not a prepared dataset, got {num_dense!r}"
        )
    return {str(k): v for k, v in declared.items()}, num_dense


# The data module is None only for a dry run (`funnel plan`) of a model whose config declares its
# shapes and whose dataset is absent: training prepares the dataset before calling a recipe.
Recipe = Callable[[RunConfig], tuple[pl.LightningModule, pl.LightningDataModule | None]]
RECIPES: dict[str, Recipe] = {
    "deepfm": _deepfm,
    "two_tower": lambda cfg: __import__("trainer.retrieval", fromlist=["*"]).build_two_tower(cfg),
    "sasrec": lambda cfg: __import__("trainer.sequential", fromlist=["*"]).sasrec_recipe(cfg),
    "gru4rec": lambda cfg: __import__("trainer.sequential", fromlist=["*"]).gru4rec_recipe(cfg),
}


def register_recipe(name: str, build: Recipe) -> None:
    RECIPES[name] = build


# -- environment ----------------------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """(global rank, world size, local world size) from torchrun's environment (1 process otherwise)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def ensure_dataset(cfg: RunConfig, timeout_s: float = 3600.0) -> None:
    """Create ``data.path`` from ``data.prepare`` on rank 0; other ranks wait for it to appear."""
    path = Path(cfg.data.path)
    if (path / "meta.json").is_file():
        return
    if not cfg.data.prepare:
        raise ConfigError(f"data.path {path} is not a prepared dataset and data.prepare is not set")
    rank, _, _ = dist_env()
    if rank == 0:
        from launch.cli import main as funnel_main

        prepare = dict(cfg.data.prepare)
        kind = prepare.pop("kind")
        args = ["data", "prepare", str(kind), "--out", str(path)]
        for key, value in prepare.items():
            flag = f"--{key.replace('_', '-')}"
            if value is True:
                args.append(flag)
            elif value not in (None, False):
                args += [flag, str(value)]
        log.info("preparing dataset: funnel %s", " ".join(args))
        code = funnel_main(args)
        if code:
            raise RuntimeError(f"`funnel {' '.join(args)}` failed with exit code {code}")
        return
    deadline = time.time() + timeout_s
    while not (path / "meta.json").is_file():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank}: {path} did not appear within {timeout_s}s")
        time.sleep(1.0)


def build_trainer(cfg: RunConfig, run_dir: Path, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
    _, world, local = dist_env()
    if world % local:
        raise ConfigError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local}")
    device_type = cfg.sharding.device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("sharding.compute_device is cuda but no CUDA device is visible")
    cfg.sparse_optimizer.check(device_type)
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if device_type == "cuda" else "32-true"
    # FBGEMM's CUDA backward kernels are not all deterministic: warn there instead of failing.
    deterministic: bool | str = cfg.trainer.deterministic
    if deterministic and device_type == "cuda":
        deterministic = "warn"
    callbacks: list[pl.Callback] = [Throughput(), ShardingReport(run_dir), *extra_callbacks]
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
        save_last="link",
        save_top_k=cfg.trainer.keep_checkpoints,
    )
    callbacks.append(checkpoint)
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps // 5)))
    fault = FaultInjection.from_env()
    if fault is not None:
        callbacks.append(fault)
    loggers: list[Any] = []
    if cfg.logger.kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs"))
    elif cfg.logger.kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        offline = cfg.logger.offline
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "offline") in ("offline", "disabled")
        loggers.append(
            WandbLogger(
                project=cfg.logger.project, name=cfg.logger.name, save_dir=str(run_dir), offline=offline
            )
        )
    elif cfg.logger.kind != "none":
        raise ConfigError(f"logger.kind {cfg.logger.kind!r}: choose csv, wandb or none")
    limits = {
        k: v
        for k, v in {
            "limit_train_batches": cfg.trainer.limit_train_batches,
            "limit_val_batches": cfg.trainer.limit_val_batches,
            "limit_test_batches": cfg.trainer.limit_test_batches,
        }.items()
        if v is not None
    }
    return pl.Trainer(
        accelerator="cuda" if device_type == "cuda" else "cpu",
        devices=local,
        num_nodes=world // local,
        strategy=TorchRecStrategy(
            sharding=cfg.sharding,
            sparse_optimizer=cfg.sparse_optimizer,
            pipeline=cfg.trainer.pipeline,
            batch_size=cfg.data.batch_size,
        ),
        precision=precision,  # type: ignore[arg-type]
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        val_check_interval=cfg.trainer.val_check_interval,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=deterministic,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        use_distributed_sampler=False,  # batches are already sharded by rank (data.loaders)
        num_sanity_val_steps=0,
        **limits,
    )


class InitFromCheckpoint(pl.Callback):
    """Loads model weights (not trainer state) from a DCP checkpoint before the first step."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {"state_dict": pl_module.state_dict()}
        dcp.load(state, checkpoint_id=self.path)
        load_module_state(pl_module, state["state_dict"])


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last.resolve()) if last.exists() else None
    if not Path(resume).exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint")
    return resume


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float | torch.Tensor)}


def evaluate(cfg: RunConfig, checkpoint: str) -> dict[str, Any]:
    """Test metrics of a checkpoint written by any world size, on this run's world size."""
    run_dir = Path(cfg.run_dir)
    rank, world, _ = dist_env()
    ensure_dataset(cfg)
    module, datamodule = RECIPES[cfg.model_name](cfg)
    cfg.trainer.checkpoint_every_n_steps = None
    trainer = build_trainer(cfg, run_dir, [])
    results = trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    summary = {
        "model": cfg.model_name,
        "checkpoint": checkpoint,
        "world_size": world,
        "metrics": _scalar_metrics(results[0]) if results else {},
    }
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "evaluation.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2), flush=True)
    return summary


def run(cfg: RunConfig, resume: str | None = None, init_from: str | None = None) -> dict[str, Any]:
    if cfg.model_name not in RECIPES:
        raise ConfigError(f"model_name {cfg.model_name!r}: choose from {sorted(RECIPES)}")
    run_dir = Path(cfg.run_dir)
    rank, world, _ = dist_env()
    ensure_dataset(cfg)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module, datamodule = RECIPES[cfg.model_name](cfg)
    extra: list[pl.Callback] = [InitFromCheckpoint(init_from)] if init_from else []
    trainer = build_trainer(cfg, run_dir, extra)
    for logger in trainer.loggers:
        logger.log_hyperparams(to_dict(cfg))
    ckpt_path = resolve_resume(resume, run_dir)
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.time() - started
    final_checkpoint = run_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(final_checkpoint)
    fit_metrics = _scalar_metrics(trainer.callback_metrics)
    test_metrics: dict[str, float] = {}
    if cfg.trainer.test_after_fit:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        test_metrics = _scalar_metrics(results[0]) if results else {}
    throughput = next(c for c in trainer.callbacks if isinstance(c, Throughput))
    report = next(c for c in trainer.callbacks if isinstance(c, ShardingReport))
    summary = {
        "model": cfg.model_name,
        "dataset": str(cfg.data.path),
        "world_size": world,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "fit_seconds": round(fit_seconds, 2),
        "samples_per_sec": round(throughput.average_rate, 1),
        "precision": str(trainer.precision),
        "pipelined": bool(getattr(module, "pipelined", False)),
        "metrics": {**fit_metrics, **test_metrics},
        "plan": [{k: r[k] for k in ("table", "sharding_type", "ranks")} for r in report.rows],
        "embedding_bytes_per_rank": report.bytes_per_rank,
        "checkpoint": str(final_checkpoint),
        "resumed_from": ckpt_path,
    }
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(format_summary(summary, report.rows), flush=True)
    return summary


def format_summary(summary: dict[str, Any], plan_rows: list[dict[str, Any]]) -> str:
    m = summary["metrics"]
    lines = [
        "=" * 72,
        f"funnel train {summary['model']}  on {summary['dataset']}  ({summary['world_size']} rank(s))",
        f"steps {summary['global_step']}  epochs {summary['epochs']}  fit {summary['fit_seconds']} s  "
        f"{summary['samples_per_sec']:,} samples/s",
        "metrics: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(m.items()) if "/" in k),
        "embedding MiB per rank: "
        + ", ".join(f"{b / 2**20:.3f}" for b in summary["embedding_bytes_per_rank"]),
        format_plan(plan_rows),
        f"checkpoint: {summary['checkpoint']}",
        "=" * 72,
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer", description="Train a funnel model (run under torchrun)."
    )
    p.add_argument("--model", help="recipe name (overrides model_name in the config)")
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    add_override_argument(p, "trainer.max_epochs=2")
    p.add_argument(
        "--resume", default=None, help="'auto' (last checkpoint of run_dir, if any) or a checkpoint path"
    )
    p.add_argument("--init-from", default=None, help="DCP checkpoint to take initial model weights from")
    p.add_argument(
        "--evaluate",
        default=None,
        metavar="CHECKPOINT",
        help="only test this checkpoint (written by any world size) and write evaluation.json",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    # epoch metrics are gathered over all ranks by the metric itself, not by Lightning
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.model:
            cfg.model_name = args.model
        if cfg.model_name not in RECIPES:
            raise ConfigError(f"model_name {cfg.model_name!r}: choose from {sorted(RECIPES)}")
        if args.evaluate:
            evaluate(cfg, args.evaluate)
        else:
            run(cfg, resume=args.resume, init_from=args.init_from)
    except ConfigError as e:
        print(f"funnel: config error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
