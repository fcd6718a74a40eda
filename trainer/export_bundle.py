"""Assemble a serving bundle from exported artifacts and the prepared dataset they were trained on.

``funnel export bundle --ranking DIR --retrieval NAME=DIR [...] --dataset PREPARED_DIR --out BUNDLE``

Layout (``../shared/DESIGN.md``; ``users/`` is an addition, see below)::

    manifest.json               kind "bundle": sha256 of every file below, models, metrics, versions
    ranking/<name>/             the ranking artifact, copied verbatim (its own manifest inside)
    retrieval/<name>/           each retrieval artifact, copied verbatim
    items/ids.npy               raw item id of index i + 1 (the dataset's item id map)
    items/sparse/<feature>.npy  the ranking model's item-side sparse features by item index
                                ([items + 1] or, multi-valued, [items + 1, max_len] 0-padded)
    items/dense.npy             item-side dense features by item index, as the model saw them
    items/embeddings.npy        L2-normalised item vectors for diversity / similar items (row 0 zero)
    items/trending.json         the most popular items of the training interactions (optionally
                                recency-weighted: ``--trending-half-life-days``)
    items/features.json         what each file above holds
    users/...                   the same for users (ids, user-side sparse and dense features) and
                                ``history.npy``: each user's newest items (the retrieval encoders' input
                                when a known user sends no recent items)

``users/`` is not in the design sketch: the ranking model scores a known user with that user's
side features (age, region, ...) and their dense properties, which a request should not have to
carry; without the table a server could only rank every user as a cold-start one.

Every artifact is verified (checksums, format version) before it is copied, and the bundle is
refused when the ranking artifact was trained on a different dataset (fingerprint mismatch) or a
retrieval index returns item ids the dataset does not know. With ``--wandb-project`` the finished
bundle is logged as a W&B Artifact of type ``bundle`` (offline when ``WANDB_MODE=offline``: it goes
to the local wandb directory and ``wandb sync`` uploads it later), in the training run when its id is
given, so "the bundle of run X" can be pulled by name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from data.shards import SPLIT_CODES, PreparedDataset, dataset_fingerprint
from serving.bundle import BundleError, atomic_directory, verify, write_manifest
from serving.features import IdLookup, load_array
from serving.ranking import RankingModel
from trainer.export_ranking import framework_versions, pad_jagged

log = logging.getLogger(__name__)

TRENDING_TOP = 1000
_CHUNK = 1_000_000
_MIN_RETRIEVAL_ID_COVERAGE = 0.99


def _side_tables(
    ds: PreparedDataset, ranking: RankingModel, side: str, out: Path, extra_columns: list[str]
) -> dict[str, Any]:
    """Write ``<side>s/`` (ids, sparse and dense features by index); returns its features.json.

    The sparse columns are the ranking model's ``side`` features plus ``extra_columns`` (the
    retrieval encoders' user features), single-valued unless the ranking spec says otherwise.
    """
    table = f"{side}s"
    field = side  # the id map of users / items is named after the field
    ids = ds.idmap(field)
    n = len(ids) + 1
    out.mkdir(parents=True)
    np.save(out / "ids.npy", ids, allow_pickle=False)
    info: dict[str, Any] = {"count": len(ids), "ids": "ids.npy", "sparse": {}, "dense": None}
    wanted = [f for f in ranking.features(side) if f.get("column")]
    wanted += [
        {"name": c, "column": c, "multi_valued": False}
        for c in extra_columns
        if c not in (field, *[f["name"] for f in wanted])
    ]
    for f in wanted:
        column = f["column"]
        if not ds.has_table(table):
            raise BundleError(f"{ds.path}: no {table} table for the ranking feature {f['name']!r}")
        (out / "sparse").mkdir(exist_ok=True)
        rel = f"sparse/{f['name']}.npy"
        if f["multi_valued"]:
            jag = ds.jagged(table, column)
            values, lengths = jag.take(np.arange(len(jag)))
            arr = pad_jagged(np.asarray(values), np.asarray(lengths), int(f["max_len"]))
        else:
            arr = np.asarray(ds.column(table, column), dtype=np.int64)
        if len(arr) != n:
            raise BundleError(f"{ds.path}: {table}.{column} has {len(arr)} rows, the {field} id map {n}")
        np.save(out / rel, arr, allow_pickle=False)
        info["sparse"][f["name"]] = {
            "file": rel,
            "multi_valued": f["multi_valued"],
            "max_len": f.get("max_len"),
        }
    dense = ranking.dense_features(side)
    if dense:
        matrix = np.tile(np.array([d["default"] for d in dense], dtype=np.float32), (n, 1))
        from_ctr = []
        for j, d in enumerate(dense):
            column = d.get("column")
            if column and ds.has_table(table) and column in ds.tables[table].columns:
                matrix[:, j] = np.asarray(ds.column(table, column), dtype=np.float32)
            else:
                from_ctr.append(j)
        if from_ctr:
            _dense_from_ctr(ds, field, [dense[j]["index"] for j in from_ctr], matrix, from_ctr)
        np.save(out / "dense.npy", matrix, allow_pickle=False)
        info["dense"] = {"file": "dense.npy", "names": [d["name"] for d in dense]}
    (out / "features.json").write_text(json.dumps(info, indent=2))
    return info


def _dense_from_ctr(
    ds: PreparedDataset, field: str, columns: list[int], matrix: np.ndarray, targets: list[int]
) -> None:
    """Per-entity values of dense ctr columns that are constant per user/item (the last seen wins)."""
    keys = ds.column("ctr", field)
    dense = ds.column("ctr", "dense")
    for lo in range(0, len(keys), _CHUNK):
        k = np.asarray(keys[lo : lo + _CHUNK])
        block = np.asarray(dense[lo : lo + _CHUNK][:, columns], dtype=np.float32)
        matrix[k[:, None], np.array(targets)[None, :]] = block


def user_history(ds: PreparedDataset, length: int) -> np.ndarray:
    """``[users + 1, length]`` item indices: each user's newest ``length`` items, newest last, 0-padded left.

    The full stored history (every split): serving happens after all of it.
    """
    users = len(ds.idmap("user")) + 1
    out = np.zeros((users, length), dtype=np.int64)
    if not ds.has_table("sequences") or length == 0:
        return out
    seq_users = np.asarray(ds.column("sequences", "user"))
    jag = ds.jagged("sequences", "items")
    offsets = np.asarray(jag.offsets)
    for row, user in enumerate(seq_users.tolist()):
        lo, hi = offsets[row], offsets[row + 1]
        items = np.asarray(jag.values[max(lo, hi - length) : hi])
        out[user, length - len(items) :] = items
    return out


def trending(ds: PreparedDataset, top: int = TRENDING_TOP, half_life_days: float = 0.0) -> dict[str, Any]:
    """Most popular items of the training interactions; each event weighs ``0.5 ** (age / half_life)``."""
    items = np.asarray(ds.column("interactions", "item"))
    keep = np.ones(len(items), dtype=bool)
    if "split" in ds.tables["interactions"].columns:
        keep = np.asarray(ds.column("interactions", "split")) == SPLIT_CODES["train"]
    items = items[keep]
    weights = np.ones(len(items))
    decay = None
    if half_life_days > 0 and "timestamp" in ds.tables["interactions"].columns and len(items):
        ts = np.asarray(ds.column("interactions", "timestamp"))[keep].astype(np.float64)
        age_days = (ts.max() - ts) / 86_400.0
        weights = np.power(0.5, age_days / half_life_days)
        decay = {"half_life_days": half_life_days, "reference_timestamp": int(ts.max())}
    scores = np.bincount(
        items, weights=weights, minlength=int(ds.tables["items"].rows) if ds.has_table("items") else 0
    )
    scores[0] = 0.0  # the OOV bucket is not an item
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] > 0][:top]
    raw = ds.idmap("item")[order - 1].tolist()
    return {
        "source": "interactions, train split",
        "decay": decay,
        "items": [
            {"item_id": r, "index": int(i), "score": float(scores[i])}
            for r, i in zip(raw, order, strict=True)
        ],
    }


def _retrieval_embeddings(root: Path, items: IdLookup) -> np.ndarray | None:
    emb_path, ids_path = root / "item_embeddings.npy", root / "ids.npy"
    if not (emb_path.is_file() and ids_path.is_file()):
        return None
    emb = load_array(emb_path).astype(np.float32)
    index = items.lookup(load_array(ids_path).tolist())
    out = np.zeros((len(items) + 1, emb.shape[1]), dtype=np.float32)
    out[index[index > 0]] = emb[index > 0]
    return out


def item_embeddings(
    ranking: RankingModel, retrieval: dict[str, Path], items: IdLookup, source: str
) -> tuple[np.ndarray, str]:
    """L2-normalised item vectors for diversity: a retrieval model's items, or the ranking item table."""
    emb: np.ndarray | None = None
    used = source
    if source == "auto":
        names = sorted(retrieval, key=lambda n: (n != "two_tower", n))
        for name in names:
            emb = _retrieval_embeddings(retrieval[name], items)
            if emb is not None:
                used = f"retrieval:{name}"
                break
        if emb is None:
            used = "ranking:item"
    elif source.startswith("retrieval:"):
        name = source.split(":", 1)[1]
        if name not in retrieval:
            raise ValueError(f"--diversity-embeddings {source}: no retrieval artifact named {name!r}")
        emb = _retrieval_embeddings(retrieval[name], items)
        if emb is None:
            raise ValueError(f"--diversity-embeddings {source}: {retrieval[name]} has no item_embeddings.npy")
    elif source != "ranking:item":
        raise ValueError(f"--diversity-embeddings {source!r}: use auto, ranking:item or retrieval:NAME")
    if emb is None:
        emb = ranking.embedding_rows("item")[: len(items) + 1]
    emb = emb.astype(np.float32)
    emb[0] = 0.0
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.where(norms > 0, emb / np.maximum(norms, 1e-12), 0.0).astype(np.float32), used


def _check_retrieval(root: Path, name: str, items: IdLookup, fingerprint: str) -> dict[str, Any]:
    manifest = verify(root)
    if manifest.get("kind") != "retrieval":
        raise BundleError(
            f"--retrieval {name}={root}: manifest kind {manifest.get('kind')!r}, expected 'retrieval'"
        )
    ids_path = root / "ids.npy"
    if not ids_path.is_file():
        raise BundleError(f"--retrieval {name}={root}: no ids.npy")
    ids = load_array(ids_path)
    known = items.lookup(ids.tolist()) > 0
    coverage = float(known.mean()) if len(known) else 0.0
    if coverage < _MIN_RETRIEVAL_ID_COVERAGE:
        raise BundleError(
            f"--retrieval {name}={root}: only {coverage:.1%} of its item ids are items of the "
            "dataset; was it trained on another dataset?"
        )
    theirs = _fingerprints_of(manifest)
    if theirs - {fingerprint}:
        raise BundleError(
            f"--retrieval {name}={root}: trained on a different dataset (fingerprint {sorted(theirs)} != "
            f"{fingerprint})"
        )
    return manifest


def _fingerprints_of(manifest: dict[str, Any]) -> set[str]:
    """The dataset fingerprints an artifact's manifest records (ranking: ``extra``; retrieval: per model)."""
    extra = manifest.get("extra", {})
    found = set()
    dataset = extra.get("dataset")
    if isinstance(dataset, dict) and dataset.get("fingerprint"):
        found.add(str(dataset["fingerprint"]))
    if extra.get("data_fingerprint"):
        found.add(str(extra["data_fingerprint"]))
    for model in manifest.get("models", {}).values():
        if isinstance(model, dict) and model.get("data_fingerprint"):
            found.add(str(model["data_fingerprint"]))
    return found


def export_bundle(
    ranking: str | os.PathLike[str],
    retrieval: dict[str, str | os.PathLike[str]],
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    ranking_name: str = "deepfm",
    overwrite: bool = False,
    trending_top: int = TRENDING_TOP,
    trending_half_life_days: float = 0.0,
    diversity_embeddings: str = "auto",
    history_length: int = 50,
    wandb_project: str | None = None,
    wandb_run_id: str | None = None,
    wandb_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the bundle directory ``out`` atomically; returns its manifest."""
    for name in [ranking_name, *retrieval]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"artifact name {name!r}: use a plain directory name")
    ds = PreparedDataset(dataset)
    fingerprint = dataset_fingerprint(ds.path)
    ranking_root = Path(ranking)
    rank_model = RankingModel.load(ranking_root)
    theirs = _fingerprints_of(rank_model.manifest)
    if theirs != {fingerprint}:
        raise BundleError(
            f"--ranking {ranking_root}: trained on a different dataset than --dataset {ds.path} "
            f"(fingerprint {theirs} != {fingerprint})"
        )
    items = IdLookup(ds.idmap("item"))
    retrieval_roots = {name: Path(p) for name, p in retrieval.items()}
    retrieval_manifests = {
        name: _check_retrieval(p, name, items, fingerprint) for name, p in retrieval_roots.items()
    }
    retrieval_metas = {
        name: json.loads((p / "meta.json").read_text()) if (p / "meta.json").is_file() else {}
        for name, p in retrieval_roots.items()
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        shutil.copytree(ranking_root, tmp / "ranking" / ranking_name)
        for name, root in retrieval_roots.items():
            shutil.copytree(root, tmp / "retrieval" / name)
        item_info = _side_tables(ds, rank_model, "item", tmp / "items", [])
        user_info = None
        if ds.meta["idmaps"].get("user"):
            columns = [
                c
                for m in retrieval_metas.values()
                for c in m.get("input_spec", {}).get("user_features", {}).get("columns", [])
            ]
            user_info = _side_tables(ds, rank_model, "user", tmp / "users", columns)
            if history_length:
                np.save(tmp / "users" / "history.npy", user_history(ds, history_length), allow_pickle=False)
                user_info["history"] = {
                    "file": "history.npy",
                    "length": history_length,
                    "order": "oldest first, newest last, 0-padded on the left",
                }
                (tmp / "users" / "features.json").write_text(json.dumps(user_info, indent=2))
        emb, source = item_embeddings(rank_model, retrieval_roots, items, diversity_embeddings)
        np.save(tmp / "items" / "embeddings.npy", emb, allow_pickle=False)
        item_info["embeddings"] = {
            "file": "embeddings.npy",
            "source": source,
            "dim": int(emb.shape[1]),
            "normalized": True,
        }
        (tmp / "items" / "trending.json").write_text(
            json.dumps(trending(ds, trending_top, trending_half_life_days), indent=1)
        )
        item_info["trending"] = "trending.json"
        (tmp / "items" / "features.json").write_text(json.dumps(item_info, indent=2))
        models = {
            "ranking": {ranking_name: {"path": f"ranking/{ranking_name}", **rank_model.manifest["models"]}},
            "retrieval": {
                name: {"path": f"retrieval/{name}", "models": m.get("models", {})}
                for name, m in retrieval_manifests.items()
            },
        }
        metrics = {
            "ranking": {ranking_name: rank_model.manifest.get("metrics", {})},
            "retrieval": {name: m.get("metrics", {}) for name, m in retrieval_manifests.items()},
        }
        runs = {f"ranking/{ranking_name}": rank_model.manifest.get("extra", {}).get("training_run_id")}
        # retrieval artifacts name their checkpoint; its run directory identifies the run
        runs.update(
            {
                f"retrieval/{n}": m.get("extra", {}).get("training_run_id")
                or retrieval_metas[n].get("checkpoint")
                for n, m in retrieval_manifests.items()
            }
        )
        extra = {
            "dataset": {"name": ds.name, "path": str(ds.path.resolve()), "fingerprint": fingerprint},
            "training_runs": runs,
            "default_ranking": ranking_name,
            "items": len(items),
            "users": user_info["count"] if user_info else 0,
        }
        manifest = write_manifest(
            tmp, "bundle", models=models, metrics=metrics, versions=framework_versions(), extra=extra
        )
    log.info("bundle -> %s (%d files)", out, len(manifest["files"]))
    if wandb_project:
        # without an explicit run, the ranking model's training run when it was a W&B run
        trained_in = rank_model.manifest.get("extra", {}).get("training_run_id")
        run_id = wandb_run_id or (trained_in if trained_in and "/" not in trained_in else None)
        log_wandb_artifact(Path(out), manifest, wandb_project, run_id, wandb_dir)
    return manifest


def log_wandb_artifact(
    bundle: Path,
    manifest: dict[str, Any],
    project: str,
    run_id: str | None,
    wandb_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Log ``bundle`` as a versioned ``bundle`` Artifact, in run ``run_id`` when given; returns its name.

    Follows ``WANDB_MODE``: offline, the artifact is staged in the local wandb directory and
    ``wandb sync <dir>`` uploads it (into the training run when ``run_id`` is that run's id).
    """
    import wandb

    dataset = manifest.get("extra", {}).get("dataset", {}).get("name", "bundle")
    name = "bundle-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in str(dataset))
    settings: dict[str, Any] = {"project": project, "job_type": "export-bundle"}
    if run_id:
        settings.update(id=run_id, resume="allow")
    if wandb_dir is not None:
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        settings["dir"] = str(wandb_dir)
    run = wandb.init(**settings)
    try:
        artifact = wandb.Artifact(
            name=name,
            type="bundle",
            metadata={
                k: manifest.get(k) for k in ("format_version", "created_at", "models", "metrics", "extra")
            },
        )
        artifact.add_dir(str(bundle))
        run.log_artifact(artifact, aliases=["latest"])
    finally:
        run.finish()
    log.info("logged W&B artifact %s (type bundle) in run %s", name, run.id)
    return name
