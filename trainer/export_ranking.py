"""DeepFM checkpoint -> ranking artifact: a ``torch.export`` program on plain tensors + safetensors weights.

``funnel export ranking --checkpoint CKPT --config CFG --out DIR [--precision fp32|fp16|int8]``

The sharded DCP checkpoint is read into a plain, unsharded :class:`models.deepfm.DeepFM` on CPU
(:func:`trainer.checkpoint.load_unsharded`; DCP reads each table's shards, nothing runs under
torchrun). :class:`RankingProgram` wraps it for inference: it takes ``dense [B, num_dense]`` float32
and one int64 tensor per sparse feature, ``[B]`` for single-valued features and ``[B, L]`` (0 =
padding, excluded from the pooling exactly as TorchRec's jagged pooling excludes absent values) for
multi-valued ones, and returns click probabilities ``[B]``. It is exported with a dynamic batch
dimension (and a dynamic ``L`` per multi-valued feature).

Embedding precision is chosen at export:

* ``fp32``: the trained tables as they are.
* ``fp16``: tables stored in half precision, gathered rows cast to float32.
* ``int8``: row-wise asymmetric quantisation (per row ``scale = (max - min) / 255``, ``bias = min``,
  ``w ~ q * scale + bias`` with ``q`` uint8), dequantised in the program after the gather, so only
  the looked-up rows are ever expanded. This is FBGEMM's row-wise int8 scheme with the scale and
  bias kept as separate float32 tensors instead of packed fp16 columns: FBGEMM's fused int8 ops are
  custom operators an exported program would depend on at load time, plain ``index_select`` is not.

Artifact layout (``serving.bundle`` manifest over all of it)::

    model.pt2              the ExportedProgram; its weights are stored as shapes only (meta tensors)
    weights.safetensors    every parameter and buffer of the program, by its state-dict name
    feature_spec.json      inputs (order, shapes, dtypes), how each feature is built from raw request
                           fields (id maps, hashing, user/item/context side, dense transforms/defaults)
    idmaps/<field>.npy     raw ids of each id-mapped field (index i + 1 = idmap[i]; 0 = OOV/padding)
    manifest.json          model type, training config, data fingerprint, metrics at export, versions

At export the artifact is loaded back the way a server loads it (``serving.ranking``) and scored
on the test split: the metrics in the manifest are the artifact's own, next to the training-time
model's, and the fp32 artifact must agree with the training-time model within ``PARITY_ATOL``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.ctr import CTRBatchBuilder, CTRDataModule, CTRSchema
from data.shards import Jagged, PreparedDataset, dataset_fingerprint
from models.deepfm import DeepFM, DeepFMConfig
from serving.bundle import atomic_directory, write_manifest
from serving.pt2 import save_program
from serving.ranking import FEATURE_SPEC_VERSION, PRECISIONS, RankingModel
from trainer.checkpoint import load_unsharded
from trainer.config import RunConfig, load_config, to_dict
from trainer.metrics import binary_auc, log_loss
from trainer.sharding import ConfigError

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-5
# Rows of the ctr table scanned to decide whether a dense feature is a property of the item, of the
# user, or of the request context (synthetic data has no explicit lookup rules for dense features).
_SIDE_SCAN_ROWS = 2_000_000
_EVAL_BATCH = 8192


# -- the inference program -------------------------------------------------------------------------
class RankingProgram(nn.Module):
    """DeepFM's scoring function on plain tensors: ``(dense, [ids per feature]) -> probabilities [B]``.

    The head (first order, dense projection, FM, deep MLP) is the trained DeepFM's own
    :class:`models.deepfm.DeepFMHead`; only the table lookup and pooling are re-expressed
    on padded tensors (TorchRec's KeyedJaggedTensor and FBGEMM kernels do not belong in a program a
    server loads without our training stack).
    """

    def __init__(self, model: DeepFM, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
        cfg = model.config
        self.precision = precision
        # (feature, table, multi-valued, mean pooling) in the model's feature order
        self.layout: list[tuple[str, str, bool, bool]] = []
        for table in cfg.tables():
            weight = model.sparse_arch.embedding_bags[table.name].weight.detach().float().cpu()
            self._register_table(table.name, weight)
            for feature in table.feature_names:
                mean = feature in cfg.mean_pooled()
                self.layout.append((feature, table.name, feature in cfg.multi_valued, mean))
        order = {name: i for i, name in enumerate(model.feature_names)}
        self.layout.sort(key=lambda entry: order[entry[0]])
        self.head = copy.deepcopy(model.head)

    def _register_table(self, name: str, weight: torch.Tensor) -> None:
        if self.precision == "fp32":
            self.register_buffer(f"table_{name}", weight.clone())
        elif self.precision == "fp16":
            self.register_buffer(f"table_{name}", weight.half())
        else:
            q, scale, bias = quantize_rowwise_int8(weight)
            self.register_buffer(f"table_{name}", q)
            self.register_buffer(f"scale_{name}", scale)
            self.register_buffer(f"offset_{name}", bias)

    def _rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, f"table_{table}")
        rows = weight[ids]
        if self.precision == "fp32":
            return rows
        if self.precision == "fp16":
            return rows.float()
        return rows.float() * getattr(self, f"scale_{table}")[ids] + getattr(self, f"offset_{table}")[ids]

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        pooled: list[torch.Tensor] = []
        for i, (_, table, multi, mean) in enumerate(self.layout):
            ids = sparse[i]
            if multi:
                # [B, L] with 0 = padding: TorchRec pools only the values present in the jagged row
                mask = (ids != 0).unsqueeze(-1).float()
                total = (self._rows(table, ids) * mask).sum(dim=1)
                pooled.append(total / mask.sum(dim=1).clamp(min=1.0) if mean else total)
            else:
                pooled.append(self._rows(table, ids))
        return torch.sigmoid(self.head(pooled, dense))


def quantize_rowwise_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric uint8: ``weight ~ q * scale + bias`` with one scale and bias per row."""
    lo = weight.min(dim=1, keepdim=True).values
    hi = weight.max(dim=1, keepdim=True).values
    scale = (hi - lo) / 255.0
    # a constant row (e.g. an untouched OOV row) has no range: any scale reproduces it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((weight - lo) / scale), 0, 255).to(torch.uint8)
    return q, scale.float(), lo.float()


def export_program(
    program: RankingProgram, example: tuple[torch.Tensor, list[torch.Tensor]]
) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (and a dynamic length per multi-valued input)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    sparse_shapes: list[dict[int, Any]] = []
    for name, _, multi, _ in program.layout:
        sparse_shapes.append(
            {0: batch, 1: torch.export.Dim(f"len_{name}", min=1, max=4096)} if multi else {0: batch}
        )
    dense_shape = {0: batch}
    with torch.no_grad():
        return torch.export.export(
            program.eval(), example, dynamic_shapes=(dense_shape, sparse_shapes), strict=False
        )


# -- training-time model and inputs ------------------------------------------------------------------
def load_training_model(cfg: RunConfig, checkpoint: str | os.PathLike[str]) -> tuple[DeepFM, CTRDataModule]:
    """The unsharded DeepFM of ``checkpoint`` on CPU (in eval mode) and the run's data module."""
    from trainer.run import RECIPES

    if cfg.model_name != "deepfm":
        raise ConfigError(f"model_name {cfg.model_name!r}: `export ranking` exports deepfm models")
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such checkpoint directory")
    module, datamodule = RECIPES["deepfm"](cfg)
    config: DeepFMConfig = module.config  # type: ignore[assignment]
    model = DeepFM(config, device=torch.device("cpu"))
    load_unsharded(model, path)
    return model.eval(), datamodule  # type: ignore[return-value]


def max_lengths(ds: PreparedDataset, schema: CTRSchema) -> dict[str, int]:
    """Longest row of each multi-valued ctr column (the server pads to it; longer input is truncated)."""
    out = {}
    for f in schema.sparse:
        if f.multi_valued:
            offsets = ds.jagged("ctr", f.name).offsets
            out[f.name] = max(1, int(np.diff(np.asarray(offsets)).max(initial=1)))
    return out


def pad_jagged(values: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Jagged rows -> ``[rows, width]`` int64, 0-padded on the right (rows longer than width truncated)."""
    out = np.zeros((len(lengths), width), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    for j in range(width):
        has = lengths > j
        out[has, j] = values[starts[has] + j]
    return out


def padded_inputs(
    ds: PreparedDataset, schema: CTRSchema, rows: np.ndarray, widths: dict[str, int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The program's inputs for ctr rows ``rows`` (the same columns CTRBatchBuilder reads)."""
    sparse = []
    for f in schema.sparse:
        if f.multi_valued:
            jag: Jagged = ds.jagged("ctr", f.name)
            values, lengths = jag.take(rows)
            sparse.append(
                torch.from_numpy(pad_jagged(np.asarray(values), np.asarray(lengths), widths[f.name]))
            )
        else:
            sparse.append(torch.from_numpy(np.asarray(ds.column("ctr", f.name)[rows], dtype=np.int64)))
    if schema.dense:
        dense = torch.from_numpy(np.asarray(ds.column("ctr", "dense")[rows], dtype=np.float32))
    else:
        dense = torch.zeros(len(rows), 0)
    return dense, sparse


def _batches(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(rows), size):
        yield rows[lo : lo + size]


# -- feature spec ------------------------------------------------------------------------------------
def _source_specs(ds: PreparedDataset) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in ds.meta.get("feature_spec", []) if isinstance(s, dict) and "name" in s}


def _encoding(ds: PreparedDataset, name: str, source: dict[str, Any]) -> dict[str, Any]:
    info = ds.info("ctr", name)
    if info.hash_buckets:
        return {
            "kind": "hash",
            "buckets": int(info.hash_buckets),
            "rule": "1 + fnv1a64(str(raw)) % buckets; integer raw ids hash to themselves; 0 = missing",
        }
    if info.idmap:
        enc: dict[str, Any] = {
            "kind": "idmap",
            "file": f"idmaps/{info.idmap}.npy",
            "rule": "index = position in the id map + 1; 0 = unknown (OOV)",
        }
        if "int(x, 16)" in str(source.get("index", "")):
            enc["parse"] = "hex"  # Criteo: raw values are hex strings, the id map holds int(x, 16)
        return enc
    raise ValueError(f"{ds.path}: ctr.{name} has neither an id map nor hash buckets")


def _sparse_side(ds: PreparedDataset, name: str, source: dict[str, Any]) -> tuple[str, str | None]:
    """Where a server finds a sparse feature: (side, column). side: user | item | context."""
    info = ds.info("ctr", name)
    if info.idmap in ("user", "item") and name in ("user", "item"):
        return info.idmap, None
    lookup = str(source.get("lookup", ""))
    for side, table in (("user", "users"), ("item", "items")):
        if lookup.startswith(f"{table}[") or (ds.has_table(table) and name in ds.tables[table].columns):
            return side, name
    return "context", None


def _dense_sides(ds: PreparedDataset, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each dense column: its side (user/item/context), transform and default (train-split mean).

    Explicit lookups in the dataset's feature spec win (``users[user index]``); otherwise a column
    that never varies for a given item (user) across the scanned rows is an item (user) property,
    and everything else comes with the request (position, time, ...).
    """
    if not names:
        return []
    source = _source_specs(ds).get("dense", {})
    transforms = {t.get("name"): t for t in source.get("transforms", []) if isinstance(t, dict)}
    split = np.asarray(ds.column("ctr", "split")[:_SIDE_SCAN_ROWS])
    rows = np.flatnonzero(split == 0)
    dense = np.asarray(ds.column("ctr", "dense")[: len(split)], dtype=np.float64)[rows]
    means = dense.mean(axis=0) if len(rows) else np.zeros(len(names))
    ids = {
        side: np.asarray(ds.column("ctr", side)[: len(split)])[rows]
        for side in ("item", "user")
        if "ctr" in ds.tables and side in ds.tables["ctr"].columns
    }
    out = []
    for j, name in enumerate(names):
        entry: dict[str, Any] = {"name": name, "index": j, "default": float(means[j])}
        t = transforms.get(name, {})
        lookup = str(t.get("lookup", ""))
        if lookup.startswith("users["):
            entry.update(side="user", column=name)
        elif lookup.startswith("items["):
            entry.update(side="item", column=name)
        else:
            entry["side"] = "context"
            for side in ("item", "user"):
                if side in ids and _constant_per_key(ids[side], dense[:, j]):
                    entry["side"] = side
                    break
        if t.get("transform"):
            entry["transform"] = {k: v for k, v in t.items() if k not in ("name", "lookup")}
        out.append(entry)
    return out


def _constant_per_key(keys: np.ndarray, values: np.ndarray, atol: float = 1e-6) -> bool:
    if len(keys) == 0:
        return False
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    if len(starts) == len(k):  # every key seen once: constancy would be vacuous
        return False
    hi = np.maximum.reduceat(v, starts)
    lo = np.minimum.reduceat(v, starts)
    return bool(np.all(hi - lo <= atol))


def build_feature_spec(
    ds: PreparedDataset, schema: CTRSchema, widths: dict[str, int], program: RankingProgram
) -> dict[str, Any]:
    """``feature_spec.json``: what a server needs to turn raw request fields into the program's inputs."""
    sources = _source_specs(ds)
    tables = {feature: table for feature, table, _, _ in program.layout}
    sparse = []
    for i, f in enumerate(schema.sparse):
        src = sources.get(f.name, {})
        side, column = _sparse_side(ds, f.name, src)
        entry: dict[str, Any] = {
            "name": f.name,
            "input": i,
            "vocab": f.vocab,
            "multi_valued": f.multi_valued,
            "side": side,
            "encoding": _encoding(ds, f.name, src),
            "table": tables[f.name],
        }
        if column:
            entry["column"] = column
        if f.multi_valued:
            entry["max_len"] = widths[f.name]
        sparse.append(entry)
    return {
        "version": FEATURE_SPEC_VERSION,
        "dataset": ds.name,
        "model": "deepfm",
        "precision": program.precision,
        "embedding_dim": program.head.embedding_dim,
        "inputs": {
            "signature": "forward(dense, sparse) -> probability",
            "dense": {"dtype": "float32", "shape": ["batch", len(schema.dense)], "names": list(schema.dense)},
            "sparse": [
                {
                    "name": f.name,
                    "dtype": "int64",
                    "shape": ["batch", f"len_{f.name}"] if f.multi_valued else ["batch"],
                    "padding": 0 if f.multi_valued else None,
                }
                for f in schema.sparse
            ],
        },
        "output": {"name": "probability", "dtype": "float32", "shape": ["batch"]},
        "sparse": sparse,
        "dense": _dense_sides(ds, schema.dense),
        "source_feature_spec": ds.meta.get("feature_spec"),
    }


# -- evaluation -------------------------------------------------------------------------------------
def _scores(
    fn: Any, ds: PreparedDataset, schema: CTRSchema, rows: np.ndarray, widths: dict[str, int]
) -> np.ndarray:
    out = []
    with torch.no_grad():
        for chunk in _batches(rows, _EVAL_BATCH):
            dense, sparse = padded_inputs(ds, schema, chunk, widths)
            out.append(np.asarray(fn(dense, sparse), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def _training_scores(model: DeepFM, datamodule: CTRDataModule, rows: np.ndarray) -> np.ndarray:
    """The training-time model on the training-time batch path (CTRBatchBuilder -> KJT)."""
    builder = CTRBatchBuilder(datamodule.dataset, datamodule.schema)
    out = []
    with torch.no_grad():
        for chunk in _batches(rows, _EVAL_BATCH):
            batch = builder(chunk)
            out.append(torch.sigmoid(model(batch.dense_features, batch.sparse_features)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_artifact(
    out: Path, model: DeepFM, datamodule: CTRDataModule, split: str = "test", max_rows: int | None = None
) -> dict[str, Any]:
    """Test-split AUC / log loss of the artifact (loaded as a server loads it) and of the training model."""
    ds, schema = datamodule.dataset, datamodule.schema
    rows = ds.split_rows("ctr", split)
    if max_rows is not None:
        rows = rows[:max_rows]
    if len(rows) == 0:
        return {"split": split, "rows": 0}
    labels = np.asarray(ds.column("ctr", "label")[rows])
    artifact = RankingModel.load(out)
    widths = {f["name"]: int(f["max_len"]) for f in artifact.spec["sparse"] if f["multi_valued"]}
    served = _scores(artifact.score_tensors, ds, schema, rows, widths)
    trained = _training_scores(model, datamodule, rows)
    return {
        "split": split,
        "rows": int(len(rows)),
        "auc": binary_auc(served, labels),
        "logloss": log_loss(served, labels),
        "training_model_auc": binary_auc(trained, labels),
        "training_model_logloss": log_loss(trained, labels),
        "auc_change": binary_auc(served, labels) - binary_auc(trained, labels),
        "max_abs_diff_vs_training_model": float(np.abs(served - trained).max()),
    }


# -- provenance ---------------------------------------------------------------------------------------
def framework_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in (
        "torch",
        "torchrec",
        "fbgemm-gpu-cpu",
        "fbgemm-gpu",
        "pytorch-lightning",
        "numpy",
        "safetensors",
        "faiss-cpu",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def training_run_id(run_dir: Path) -> str:
    """The W&B run id when the run logged to W&B (``wandb/latest-run``), else the run directory."""
    latest = run_dir / "wandb" / "latest-run"
    if latest.exists():
        name = latest.resolve().name  # offline-run-YYYYMMDD_HHMMSS-<id> / run-...-<id>
        return name.rsplit("-", 1)[-1]
    return str(run_dir.resolve())


def _run_dir_of(checkpoint: Path, cfg: RunConfig) -> Path:
    # checkpoints live in <run_dir>/checkpoints/; fall back to the config's run_dir
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else Path(cfg.run_dir)


# -- entry point ------------------------------------------------------------------------------------
def export_ranking(
    checkpoint: str | os.PathLike[str],
    config: str | os.PathLike[str] | RunConfig,
    out: str | os.PathLike[str],
    precision: str = "fp32",
    *,
    overrides: list[str] | None = None,
    run_id: str | None = None,
    overwrite: bool = False,
    eval_split: str = "test",
    eval_rows: int | None = None,
) -> dict[str, Any]:
    """Write the ranking artifact of a DeepFM checkpoint to ``out`` (atomically); returns its manifest."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {PRECISIONS}")
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    checkpoint = Path(checkpoint)
    model, datamodule = load_training_model(cfg, checkpoint)
    ds, schema = datamodule.dataset, datamodule.schema
    widths = max_lengths(ds, schema)
    program = RankingProgram(model, precision).eval()
    example_rows = ds.split_rows("ctr", "train")[:4]
    if len(example_rows) < 2:
        example_rows = np.arange(min(4, ds.tables["ctr"].rows))
    example = padded_inputs(ds, schema, example_rows, widths)
    exported = export_program(program, example)
    run_dir = _run_dir_of(checkpoint, cfg)
    summary_path = run_dir / "summary.json"
    training_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_program(tmp, exported)
        spec = build_feature_spec(ds, schema, widths, program)
        (tmp / "feature_spec.json").write_text(json.dumps(spec, indent=2))
        (tmp / "idmaps").mkdir()
        for entry in spec["sparse"]:
            enc = entry["encoding"]
            if enc["kind"] == "idmap":
                field = Path(enc["file"]).stem
                shutil.copyfile(ds.path / ds.meta["idmaps"][field], tmp / enc["file"])
        model_info = {
            "type": "deepfm",
            "precision": precision,
            "config": dataclasses.asdict(model.config),
            "num_parameters": int(sum(t.numel() for t in program.state_dict().values())),
        }
        sizes = {p.name: p.stat().st_size for p in (tmp / "model.pt2", tmp / "weights.safetensors")}
        extra = {
            "training_config": to_dict(cfg),
            "training_run_id": run_id or training_run_id(run_dir),
            "checkpoint": str(checkpoint.resolve()),
            "training_metrics": training_summary.get("metrics", {}),
            "dataset": {
                "name": ds.name,
                "path": str(ds.path.resolve()),
                "fingerprint": dataset_fingerprint(ds.path),
            },
            "sizes_bytes": sizes,
        }
        write_manifest(
            tmp, "ranking", models={"deepfm": model_info}, versions=framework_versions(), extra=extra
        )
        metrics = evaluate_artifact(tmp, model, datamodule, eval_split, eval_rows)
        if precision == "fp32" and metrics.get("rows"):
            worst = metrics["max_abs_diff_vs_training_model"]
            if worst > PARITY_ATOL:
                raise RuntimeError(
                    f"fp32 artifact differs from the training-time model by {worst:.3g} > {PARITY_ATOL}"
                )
        manifest = write_manifest(
            tmp,
            "ranking",
            models={"deepfm": model_info},
            metrics={eval_split: metrics},
            versions=framework_versions(),
            extra=extra,
        )
    log.info("ranking artifact (%s) -> %s: %s", precision, out, json.dumps(metrics))
    return manifest
