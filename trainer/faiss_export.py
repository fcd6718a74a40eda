"""Item embeddings -> a FAISS index and a retrieval artifact (shared by every retrieval model).

:func:`build_index` builds an inner-product index (exact ``IndexFlatIP``, IVF-Flat, IVF-PQ or
HNSW) on a GPU when FAISS has GPU support and a GPU is visible, on the CPU otherwise, and always
returns a CPU index (the form that is saved and that serving loads).
:func:`evaluate_index` measures what the approximation costs: recall@k against exact search and
queries/s of both. :func:`write_retrieval_artifact` writes the directory serving reads::

    index.faiss          the index (row r = item ids[r])
    ids.npy              index row -> raw item id (the dataset's id map)
    item_embeddings.npy  float32 [items, dim], the vectors the index was built from
    encoder.pt2          the query tower (torch.export, dynamic batch), when the model has one
    meta.json            dims, metric, index config, ANN quality, model/data fingerprints, input spec
    manifest.json        serving.bundle manifest (sha256 of every file)

The directory is written atomically (``serving.bundle.atomic_directory``) and an existing
artifact of another model is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from serving.bundle import atomic_directory, write_manifest

log = logging.getLogger(__name__)

ARTIFACT_FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
# k-means wants at least this many training points per centroid (FAISS warns below it)
MIN_POINTS_PER_CENTROID = 39
_QUERY_SAMPLE = 1000


@dataclass
class IndexConfig:
    kind: str = "flat"  # flat | ivf_flat | ivf_pq | hnsw
    nlist: int = 256  # IVF lists (lowered to items / 39 for small catalogs, see effective_nlist)
    nprobe: int = 16  # IVF lists searched per query
    pq_m: int = 16  # PQ sub-quantizers (must divide the dimension)
    pq_bits: int = 8  # bits per sub-quantizer code
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    use_gpu: str = "auto"  # auto | yes | no

    def validate(self, dim: int | None = None) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r}: choose one of {INDEX_KINDS}")
        if self.use_gpu not in ("auto", "yes", "no"):
            raise ValueError(f"index use_gpu {self.use_gpu!r}: choose auto, yes or no")
        for name in ("nlist", "nprobe", "pq_m", "pq_bits", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"index {name} must be > 0, got {getattr(self, name)}")
        if self.kind == "ivf_pq" and dim is not None and dim % self.pq_m:
            raise ValueError(f"index pq_m {self.pq_m} must divide the embedding dimension {dim}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def effective_nlist(cfg: IndexConfig, n: int) -> int:
    """IVF lists actually used: at most ``n / 39`` so that every centroid is trained on enough points."""
    return max(1, min(cfg.nlist, n // MIN_POINTS_PER_CENTROID))


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _use_gpu(cfg: IndexConfig) -> bool:
    if cfg.use_gpu == "no":
        return False
    available = _gpu_available()
    if cfg.use_gpu == "yes" and not available:
        raise RuntimeError("index use_gpu=yes but this FAISS has no GPU support or no GPU is visible")
    # HNSW has no GPU implementation in FAISS; it is built on the CPU whatever use_gpu says
    return available and cfg.kind != "hnsw"


def _cpu_index(cfg: IndexConfig, dim: int, n: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
        return index
    nlist = effective_nlist(cfg, n)
    quantizer = faiss.IndexFlatIP(dim)
    if cfg.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    else:
        if n < 2**cfg.pq_bits:
            raise ValueError(
                f"index pq_bits {cfg.pq_bits} needs at least {2**cfg.pq_bits} items to train, got {n}"
            )
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, cfg.pq_bits, ip)
    index.nprobe = min(cfg.nprobe, nlist)
    return index


def build_index(embeddings: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """An inner-product index over ``embeddings [n, dim]``; a CPU index, whatever it was built on."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [items, dim] array, got shape {x.shape}")
    n, dim = x.shape
    cfg.validate(dim)
    index = _cpu_index(cfg, dim, n)
    if _use_gpu(cfg):
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, index)
        if not gpu.is_trained:
            gpu.train(x)
        gpu.add(x)
        index = faiss.index_gpu_to_cpu(gpu)
        if cfg.kind in ("ivf_flat", "ivf_pq"):
            faiss.extract_index_ivf(index).nprobe = min(cfg.nprobe, effective_nlist(cfg, n))
    else:
        if not index.is_trained:
            index.train(x)
        index.add(x)
    return index


def _timed_search(
    index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 3
) -> tuple[np.ndarray, float]:
    """Results and the best of ``repeats`` timings (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - started)
    return ids, best


def evaluate_index(
    index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int = 100
) -> dict[str, Any]:
    """Recall@k of ``index`` against exact inner-product search over ``embeddings``, and queries/s
    (best of 3 runs of the whole query set).

    Recall counts the exact top-k rows the index also returns (ties at the k-th score make this a
    slight underestimate, never an overestimate of what a user would notice).
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"queries must be [n, {x.shape[1]}], got shape {q.shape}")
    k = min(k, x.shape[0])
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth, exact_s = _timed_search(exact, q, k)
    found, ann_s = _timed_search(index, q, k)
    hits = sum(
        len(np.intersect1d(t, f[f >= 0], assume_unique=True)) for t, f in zip(truth, found, strict=True)
    )
    return {
        "k": k,
        "queries": int(q.shape[0]),
        f"recall@{k}": hits / (k * q.shape[0]),
        "qps": q.shape[0] / max(ann_s, 1e-9),
        "exact_qps": q.shape[0] / max(exact_s, 1e-9),
    }


def _fingerprint_of(path: Path) -> str | None:
    meta = path / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("model_fingerprint")
    except json.JSONDecodeError:
        return None


def write_retrieval_artifact(
    out: Path,
    item_embeddings: np.ndarray,
    item_ids: np.ndarray,
    cfg: IndexConfig,
    *,
    query_encoder: torch.export.ExportedProgram | None,
    meta: dict[str, Any],
    overwrite: bool = False,
    queries: np.ndarray | None = None,
) -> Path:
    """Build the index of ``item_embeddings`` and write the artifact directory ``out`` atomically.

    ``meta`` must carry ``model_type`` and ``model_fingerprint`` (plus whatever serving needs:
    ``data_fingerprint``, ``input_spec``, ``id_maps``); dimensions, index config, FAISS version and
    the ANN evaluation are added here. ``queries`` (e.g. real user embeddings) drive the ANN
    evaluation; without them a sample of the items themselves is used. Re-exporting the same model
    replaces the artifact; a different model's artifact (or any other directory) is only replaced
    with ``overwrite=True``.
    """
    out = Path(out)
    for key in ("model_type", "model_fingerprint"):
        if not meta.get(key):
            raise ValueError(f"meta[{key!r}] is required")
    x = np.ascontiguousarray(item_embeddings, dtype=np.float32)
    ids = np.asarray(item_ids)
    if x.ndim != 2 or len(ids) != x.shape[0]:
        raise ValueError(f"item_ids has {len(ids)} rows, item_embeddings has shape {x.shape}")
    if out.exists() and not overwrite:
        existing = _fingerprint_of(out)
        if existing is None:
            raise FileExistsError(
                f"{out} exists and is not a retrieval artifact; pass overwrite=True (--overwrite)"
            )
        if existing != meta["model_fingerprint"]:
            raise FileExistsError(
                f"{out} holds the index of another model (fingerprint {existing[:12]}, this one "
                f"{meta['model_fingerprint'][:12]}); pass overwrite=True (--overwrite) to replace it"
            )
    started = time.perf_counter()
    index = build_index(x, cfg)
    build_s = time.perf_counter() - started
    if queries is None:
        rng = np.random.default_rng(0)
        queries = x[rng.choice(len(x), size=min(_QUERY_SAMPLE, len(x)), replace=False)]
    quality = evaluate_index(index, x, queries, k=min(100, len(x)))
    norms = np.linalg.norm(x, axis=1)
    full_meta = {
        **meta,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "dim": int(x.shape[1]),
        "metric": "ip",
        "normalised": bool(np.allclose(norms, 1.0, atol=1e-4)),
        "item_count": int(x.shape[0]),
        "faiss_version": faiss.__version__,
        "index": {
            **cfg.to_json(),
            "effective_nlist": effective_nlist(cfg, len(x)) if "ivf" in cfg.kind else None,
            "built_on": "gpu" if _use_gpu(cfg) else "cpu",
            "build_seconds": build_s,
        },
        "ann": quality,
        "encoder": "encoder.pt2" if query_encoder is not None else None,
    }
    with atomic_directory(out, overwrite=True) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "ids.npy", ids, allow_pickle=False)
        np.save(tmp / "item_embeddings.npy", x, allow_pickle=False)
        if query_encoder is not None:
            torch.export.save(query_encoder, tmp / "encoder.pt2")
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True, default=_json_default))
        write_manifest(
            tmp,
            "retrieval",
            models={
                meta["model_type"]: {
                    "fingerprint": meta["model_fingerprint"],
                    "data_fingerprint": meta.get("data_fingerprint"),
                }
            },
            metrics={"ann": quality},
            versions={"faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__},
            extra={"index_kind": cfg.kind, "dim": int(x.shape[1]), "item_count": int(x.shape[0])},
        )
    log.info("retrieval artifact %s: %d items, %s index, %s", out, len(x), cfg.kind, quality)
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
