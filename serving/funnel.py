"""The recommendation funnel over a loaded bundle: retrieve -> rank -> re-rank.

:class:`Funnel` is one verified, fully loaded bundle (immutable once built, so a hot reload swaps
a whole new one in while in-flight requests finish on the old one). A request goes through:

1. **Retrieval** (candidate sources, each a ranked list with its own scores):
   ``<two-tower name>`` (the user/query tower + its FAISS index) for a known user, or for an
   unknown one who brings user features or recent items; ``<sequential name>`` (a SASRec-style
   encoder over the recent items, left-padded, newest last) when recent items are given;
   ``similar_to_recent`` (nearest items to the mean of the recent items' vectors) when recent items
   are given; ``trending`` (training popularity) always, with a larger share for cold-start users.
   A request may instead name its ``candidates``: retrieval is skipped and exactly those are ranked.
2. **Blending**: the sources are interleaved rank by rank (the 1st of every source, then the 2nd,
   ...), de-duplicated, and excluded items (request ``exclude``, recent items unless
   ``exclude_recent`` is false) removed, up to ``max_candidates``.
3. **Ranking**: one batched call of the DeepFM program over all candidates; user-side features
   come from the bundle's user table (overridable by the request), item-side ones from the item
   table, context features from the request (training means when absent).
4. **Re-ranking** (MMR, Carbonell & Goldstein 1998): greedily pick the candidate maximising
   ``(1 - diversity) * p(click) - diversity * max cosine similarity to the items already picked``,
   with the bundle's item vectors; ``diversity = 0`` is the ranking order.

Unknown users (no ``user_id``, or an id the bundle does not know) are never an error: they get the
cold-start path (trending plus what their recent items and features suggest).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from serving.bundle import MANIFEST, BundleError, verify
from serving.features import FieldEncoder, IdLookup, apply_transform, load_array
from serving.pt2 import input_names, load_exported
from serving.ranking import RankingModel

STAGES = ("retrieval", "ranking", "rerank")
TRENDING = "trending"
SIMILAR_TO_RECENT = "similar_to_recent"
REQUEST = "request"  # candidates given by the request (score = their position in it)
_SEQUENCE_INPUTS = ("seq", "sequence", "item_seq", "items", "input_ids")


class RequestError(ValueError):
    """A request the bundle cannot serve as asked; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class RecommendRequest:
    user_id: str | int | None = None
    user_features: dict[str, Any] = field(default_factory=dict)
    recent_items: list[str | int] = field(default_factory=list)  # oldest first, newest last
    k: int = 10
    exclude: list[str | int] = field(default_factory=list)
    diversity: float = 0.0
    context: dict[str, float] = field(default_factory=dict)
    exclude_recent: bool = True
    candidates: list[str | int] | None = None  # rank exactly these items (retrieval skipped)


@dataclass
class FunnelConfig:
    per_source: int = 150  # candidates taken from each ANN source
    trending_known: int = 50  # trending candidates for a known user
    trending_cold: int = 150  # ... and for a cold-start user
    similar_recent_items: int = 10  # newest recent items whose vectors seed similar_to_recent
    max_candidates: int = 300  # ranked per request (one batched model call)


class SideTable:
    """``users/`` or ``items/``: raw ids, sparse features and dense features by index."""

    def __init__(self, root: Path) -> None:
        try:
            info = json.loads((root / "features.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{root}: unreadable features.json ({e})") from e
        self.root = root
        self.info = info
        self.ids = IdLookup(load_array(root / info["ids"]))
        n = len(self.ids) + 1
        self.sparse: dict[str, np.ndarray] = {}
        for name, entry in info.get("sparse", {}).items():
            arr = load_array(root / entry["file"]).astype(np.int64, copy=False)
            if len(arr) != n:
                raise BundleError(f"{root}/{entry['file']}: {len(arr)} rows, expected {n}")
            self.sparse[name] = arr
        self.dense: np.ndarray | None = None
        self.dense_names: list[str] = []
        if info.get("dense"):
            self.dense = load_array(root / info["dense"]["file"]).astype(np.float32, copy=False)
            self.dense_names = list(info["dense"]["names"])
            if self.dense.shape != (n, len(self.dense_names)):
                raise BundleError(
                    f"{root}: dense features of shape {self.dense.shape}, expected "
                    f"({n}, {len(self.dense_names)})"
                )

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class UserContext:
    """One request's user: index (0 = unknown), side-feature indices and dense values by name."""

    index: int
    sparse: dict[str, np.ndarray]  # name -> [] (single) or [L] indices
    dense: dict[str, float]
    recent: np.ndarray  # known recent item indices, oldest first (stored history, then the request's)
    given_features: bool
    sent_recent: bool = False  # the request itself named recent items


class Retriever:
    """One retrieval artifact: FAISS index over items + (optionally) a query encoder."""

    def __init__(self, name: str, root: Path, items: IdLookup) -> None:
        self.name = name
        self.root = root
        manifest = verify(root)
        if manifest.get("kind") != "retrieval":
            raise BundleError(f"{root}: manifest kind {manifest.get('kind')!r}, expected 'retrieval'")
        try:
            self.meta = json.loads((root / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{root}: unreadable meta.json ({e})") from e
        try:
            self.index = faiss.read_index(str(root / "index.faiss"))
        except RuntimeError as e:
            raise BundleError(f"{root}/index.faiss: not a FAISS index ({e})") from e
        ids = load_array(root / "ids.npy")
        if len(ids) != self.index.ntotal:
            raise BundleError(f"{root}: ids.npy has {len(ids)} rows, the index {self.index.ntotal}")
        self.row_item = items.lookup(ids.tolist())
        self.module: torch.nn.Module | None = None
        self.inputs: list[str] = []
        self.spec: dict[str, Any] = self.meta.get("input_spec") or {}
        encoder = self.meta.get("encoder")
        if encoder:
            program = load_exported(root / str(encoder))
            self.inputs = input_names(program)
            self.module = program.module()
            for name in self.inputs:
                if name not in ("user_features", "history", *_SEQUENCE_INPUTS):
                    raise BundleError(f"{root}: encoder input {name!r} is not one serving can fill")
        self.sequential = bool(self.inputs) and all(n in _SEQUENCE_INPUTS for n in self.inputs)
        self.user_columns: list[str] = list(self.spec.get("user_features", {}).get("columns", []))

    def _length(self, name: str, default: int = 50) -> int:
        entry = self.spec.get(name, {})
        length = entry.get("max_length")
        if length is None and isinstance(entry.get("shape"), list) and len(entry["shape"]) > 1:
            length = entry["shape"][1] if isinstance(entry["shape"][1], int) else None
        return max(1, int(length or default))

    def wants(self, user: UserContext) -> bool:
        if self.module is None:
            return False
        if self.sequential:
            return len(user.recent) > 0
        return user.index > 0 or len(user.recent) > 0 or user.given_features

    def query(self, user: UserContext) -> np.ndarray:
        assert self.module is not None
        args = []
        for name in self.inputs:
            if name == "user_features":
                row = [
                    user.index if c == "user" else _scalar(user.sparse.get(c, 0)) for c in self.user_columns
                ]
                args.append(torch.tensor([row], dtype=torch.int64).reshape(1, len(self.user_columns)))
            else:
                length = self._length(name, 20 if name == "history" else 50)
                recent = user.recent[-length:]
                seq = np.zeros((1, length), dtype=np.int64)
                if name == "history":
                    seq[0, : len(recent)] = recent
                else:  # sequence models read a left-padded sequence, newest item last
                    seq[0, length - len(recent) :] = recent
                args.append(torch.from_numpy(seq))
        with torch.inference_mode():
            return self.module(*args).float().numpy()

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(np.ascontiguousarray(query, dtype=np.float32), n)
        rows, scores = rows[0], scores[0]
        ok = rows >= 0
        items = self.row_item[rows[ok]]
        known = items > 0
        return items[known], scores[ok][known]


class Funnel:
    """A verified, loaded bundle and the request pipeline over it."""

    def __init__(self, root: Path, manifest: dict[str, Any], config: FunnelConfig | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.config = config or FunnelConfig()
        self.version = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:16]
        extra = manifest.get("extra", {})
        ranking_dir = root / "ranking"
        names = sorted(p.name for p in ranking_dir.iterdir() if p.is_dir()) if ranking_dir.is_dir() else []
        if not names:
            raise BundleError(f"{root}: no ranking artifact under ranking/")
        self.ranking_name = extra.get("default_ranking", names[0])
        if self.ranking_name not in names:
            raise BundleError(f"{root}: default ranking {self.ranking_name!r} not among {names}")
        self.ranking = RankingModel.load(ranking_dir / self.ranking_name)
        self.items = SideTable(root / "items")
        self.users = SideTable(root / "users") if (root / "users").is_dir() else None
        self.user_history: np.ndarray | None = None
        if self.users is not None and self.users.info.get("history"):
            self.user_history = load_array(root / "users" / self.users.info["history"]["file"]).astype(
                np.int64
            )
            if len(self.user_history) != len(self.users) + 1:
                raise BundleError(f"{root}: users/history has {len(self.user_history)} rows")
        self._check_id_space()
        self.item_vectors = load_array(root / "items" / self.items.info["embeddings"]["file"]).astype(
            np.float32
        )
        if len(self.item_vectors) != len(self.items) + 1:
            raise BundleError(
                f"{root}: item embeddings have {len(self.item_vectors)} rows, expected {len(self.items) + 1}"
            )
        trending = json.loads((root / "items" / self.items.info["trending"]).read_text())
        self.trending = np.array([int(t["index"]) for t in trending["items"]], dtype=np.int64)
        self.trending_scores = np.array([float(t["score"]) for t in trending["items"]], dtype=np.float32)
        if len(self.trending) and (self.trending.min() < 1 or self.trending.max() > len(self.items)):
            raise BundleError(f"{root}: trending.json names item indices outside 1..{len(self.items)}")
        retrieval_dir = root / "retrieval"
        self.retrievers = [
            Retriever(p.name, p, self.items.ids)
            for p in (sorted(retrieval_dir.iterdir()) if retrieval_dir.is_dir() else [])
            if p.is_dir()
        ]
        self.user_encoders = self._user_encoders()
        self.user_sparse = {f["name"]: f for f in self.ranking.features("user") if f.get("column")}
        self.user_dense = {f["name"]: f for f in self.ranking.dense_features("user")}
        self.context_sparse = {f["name"]: f for f in self.ranking.features("context")}
        self.context_dense = {f["name"] for f in self.ranking.dense_features("context")}

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: FunnelConfig | None = None) -> Funnel:
        """Verify every checksum and the format version, load every model, and run one request."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"{root}: not a directory")
        manifest = verify(root)
        if manifest.get("kind") != "bundle":
            raise BundleError(f"{root}: manifest kind {manifest.get('kind')!r}, expected 'bundle'")
        try:
            funnel = cls(root, manifest, config)
        except BundleError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, OSError, RuntimeError) as e:
            raise BundleError(f"{root}: cannot load ({type(e).__name__}: {e})") from e
        try:
            funnel.recommend(RecommendRequest(k=3, recent_items=funnel.items.ids.raw_ids(np.array([1]))))
        except Exception as e:  # noqa: BLE001 - a bundle that cannot answer must not be served
            raise BundleError(f"{root}: a smoke-test request failed ({type(e).__name__}: {e})") from e
        return funnel

    def _check_id_space(self) -> None:
        item = self.ranking.encoders.get("item")
        if item is not None and item.lookup_table is not None and len(item.lookup_table) != len(self.items):
            raise BundleError(
                f"{self.root}: the ranking model knows {len(item.lookup_table)} items, "
                f"the item table {len(self.items)}"
            )

    def _user_encoders(self) -> dict[str, FieldEncoder]:
        """Raw -> index rules of every user-side field a request may set (ranking and retrieval)."""
        # side features only: the user's own id comes as ``user_id``
        out = {
            f["name"]: self.ranking.encoders[f["name"]]
            for f in self.ranking.features("user")
            if f.get("column")
        }
        for r in self.retrievers:
            for name, rule in (r.meta.get("id_maps") or {}).items():
                if name in out or name in ("history", "user") or not isinstance(rule, dict):
                    continue
                if isinstance(rule.get("raw_ids"), list):
                    out[name] = FieldEncoder(name, lookup=IdLookup(np.asarray(rule["raw_ids"])))
                elif rule.get("hash_buckets"):
                    out[name] = FieldEncoder(name, buckets=int(rule["hash_buckets"]))
        return out

    @property
    def info(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": str(self.root),
            "created_at": self.manifest.get("created_at"),
            "ranking": self.ranking_name,
            "retrieval": [r.name for r in self.retrievers],
            "items": len(self.items),
            "users": len(self.users) if self.users else 0,
            "dataset": self.manifest.get("extra", {}).get("dataset", {}).get("name"),
        }

    # -- request -> user --------------------------------------------------------------------------
    def _user(self, req: RecommendRequest) -> UserContext:
        index = 0
        if req.user_id is not None and self.users is not None:
            index = int(self.users.ids.lookup([req.user_id])[0])
        elif req.user_id is not None and "user" in self.ranking.encoders:
            # hashed user ids (no user table in the bundle): the hash bucket is the user's index
            index = int(self.ranking.encoders["user"].encode([req.user_id])[0])
        sparse: dict[str, np.ndarray] = {}
        if self.users is not None:
            for name, arr in self.users.sparse.items():
                sparse[name] = arr[index]
        dense: dict[str, float] = {}
        if self.users is not None and self.users.dense is not None and index > 0:
            dense = dict(zip(self.users.dense_names, self.users.dense[index].tolist(), strict=True))
        for name, value in req.user_features.items():
            enc = self.user_encoders.get(name)
            if enc is not None:
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
                    raise RequestError(
                        f"user_features.{name}", "expected a raw id (string or integer) or a list"
                    )
                encoded = enc.encode(values)
                sparse[name] = encoded if isinstance(value, list) else encoded[0]
            elif name in self.user_dense:
                if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
                    raise RequestError(f"user_features.{name}", "expected a finite number")
                dense[name] = apply_transform(self.user_dense[name].get("transform"), float(value))
            else:
                known = sorted([*self.user_encoders, *self.user_dense])
                raise RequestError(f"user_features.{name}", f"unknown user feature; known: {known}")
        sent = self.items.ids.lookup(req.recent_items)
        sent = sent[sent > 0]
        recent = sent
        if index > 0 and self.user_history is not None:
            stored = self.user_history[index]
            recent = np.concatenate([stored[stored > 0], recent])
        return UserContext(index, sparse, dense, recent, bool(req.user_features), bool(len(sent)))

    # -- retrieval -------------------------------------------------------------------------------
    def _retrieve(self, user: UserContext, exclude: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cfg = self.config
        lists: list[tuple[str, np.ndarray, np.ndarray]] = []
        for r in self.retrievers:
            if r.wants(user):
                items, scores = r.search(r.query(user), cfg.per_source)
                lists.append((r.name, items, scores))
        # a session signal (recent items sent with the request) or a cold-start user's only signal;
        # a known user's stored history already feeds the retrieval encoders
        if len(user.recent) and (user.sent_recent or user.index == 0):
            seed = self.item_vectors[user.recent[-cfg.similar_recent_items :]].mean(axis=0)
            if np.any(seed):
                lists.append((SIMILAR_TO_RECENT, *self.nearest(seed, cfg.per_source)))
        n_trend = cfg.trending_known if user.index > 0 else cfg.trending_cold
        lists.append((TRENDING, self.trending[:n_trend], self.trending_scores[:n_trend]))
        return blend(lists, exclude, cfg.max_candidates, len(self.items))

    # -- ranking ---------------------------------------------------------------------------------
    def _inputs(
        self, user: UserContext, cand: np.ndarray, req: RecommendRequest
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        n = len(cand)
        sparse: list[np.ndarray] = []
        for f in self.ranking.sparse:
            name, side = f["name"], f["side"]
            width = int(f.get("max_len") or 1)
            if side == "item":
                col = cand if f.get("column") is None else self.items.sparse[name][cand]
            elif side == "user":
                value = np.asarray(user.index if f.get("column") is None else user.sparse.get(name, 0))
                col = _repeat(value, n, f["multi_valued"], width)
            else:
                raw = req.context.get(name)
                if raw is None:
                    value = np.zeros(width if f["multi_valued"] else (), dtype=np.int64)
                else:
                    values = raw if isinstance(raw, list) else [raw]
                    value = self.ranking.encoders[name].encode(values)
                    value = value if f["multi_valued"] else value[:1].reshape(())
                col = _repeat(value, n, f["multi_valued"], width)
            if f["multi_valued"] and col.shape[1] != width:
                col = _fit_width(col, width)
            sparse.append(col)
        dense_row = self.ranking.context_dense(
            {k: v for k, v in req.context.items() if k in self.context_dense}
        )
        dense = np.tile(dense_row, (n, 1))
        for f in self.ranking.dense:
            if f["side"] == "user" and f["name"] in user.dense:
                dense[:, f["index"]] = user.dense[f["name"]]
        if self.items.dense is not None:
            item_dense = self.items.dense[cand]
            for j, name in enumerate(self.items.dense_names):
                spec = next((f for f in self.ranking.dense if f["name"] == name), None)
                if spec is not None:
                    dense[:, spec["index"]] = item_dense[:, j]
        return dense, sparse

    def _check_request(self, req: RecommendRequest) -> None:
        for name, value in req.context.items():
            if name in self.context_dense:
                if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
                    raise RequestError(f"context.{name}", "expected a finite number")
            elif name in self.context_sparse:
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
                    raise RequestError(f"context.{name}", "expected a raw id (string or integer) or a list")
            else:
                known = sorted([*self.context_dense, *self.context_sparse])
                raise RequestError(f"context.{name}", f"unknown context feature; known: {known}")

    def recommend(self, req: RecommendRequest) -> dict[str, Any]:
        started = time.perf_counter()
        self._check_request(req)
        user = self._user(req)
        exclude = self.items.ids.lookup(req.exclude)
        if req.exclude_recent:
            exclude = np.concatenate([exclude, user.recent])
        if req.candidates is not None:
            given = self.items.ids.lookup(req.candidates)
            given = given[given > 0]
            _, first = np.unique(given, return_index=True)
            given = given[np.sort(first)]
            cand, source_scores = blend(
                [(REQUEST, given, np.arange(len(given), dtype=np.float32))],
                exclude,
                len(given),
                len(self.items),
            )
        else:
            cand, source_scores = self._retrieve(user, exclude)
        t_retrieval = time.perf_counter()
        probs = np.zeros(0, dtype=np.float32)
        if len(cand):
            dense, sparse = self._inputs(user, cand, req)
            probs = self.ranking.score(dense, sparse)
        t_ranking = time.perf_counter()
        order, mmr, max_sim = mmr_rerank(probs, self.item_vectors[cand], req.k, req.diversity)
        t_rerank = time.perf_counter()
        raw = self.items.ids.raw_ids(cand[order]) if len(order) else []
        results = []
        for pos, (item_id, i) in enumerate(zip(raw, order.tolist(), strict=True)):
            retrieval = {s: float(v[i]) for s, v in source_scores.items() if not np.isnan(v[i])}
            results.append(
                {
                    "item_id": item_id,
                    "score": float(mmr[pos]),
                    "stages": {
                        "retrieval": retrieval,
                        "ranking": float(probs[i]),
                        "rerank": float(mmr[pos]),
                        "max_similarity": float(max_sim[pos]),
                    },
                }
            )
        counts = {s: int((~np.isnan(v)).sum()) for s, v in source_scores.items()}
        return {
            "items": results,
            "user_known": user.index > 0,
            "cold_start": user.index == 0,
            "candidates": int(len(cand)),
            "sources": counts,
            "bundle": self.version,
            "latency_ms": {
                "retrieval": 1000 * (t_retrieval - started),
                "ranking": 1000 * (t_ranking - t_retrieval),
                "rerank": 1000 * (t_rerank - t_ranking),
                "total": 1000 * (time.perf_counter() - started),
            },
        }

    def nearest(self, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` items of highest inner product with ``vector`` (exact; one mat-vec), best first."""
        scores = self.item_vectors[1:] @ np.asarray(vector, dtype=np.float32)
        n = min(n, len(scores))
        if n <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top + 1, scores[top]

    def similar(self, item_id: str | int, k: int) -> dict[str, Any]:
        index = int(self.items.ids.lookup([item_id])[0])
        if index == 0:
            raise KeyError(item_id)
        raw = self.items.ids.raw_ids(np.array([index]))[0]
        vector = self.item_vectors[index]
        if not np.any(vector):
            return {"item_id": raw, "items": []}
        items, sims = self.nearest(vector, k + 1)
        keep = items != index
        items, sims = items[keep][:k], sims[keep][:k]
        return {
            "item_id": raw,
            "items": [
                {"item_id": r, "similarity": float(s)}
                for r, s in zip(self.items.ids.raw_ids(items), sims.tolist(), strict=True)
            ],
        }


def _scalar(value: Any) -> int:
    """The index of a single-valued feature (the first one if a list was given, 0 if none)."""
    flat = np.asarray(value, dtype=np.int64).reshape(-1)
    return int(flat[0]) if len(flat) else 0


def _repeat(value: np.ndarray, n: int, multi: bool, width: int) -> np.ndarray:
    if multi:
        row = _fit_width(np.asarray(value, dtype=np.int64).reshape(1, -1), width)
        return np.repeat(row, n, axis=0)
    return np.full(n, _scalar(value), dtype=np.int64)


def _fit_width(rows: np.ndarray, width: int) -> np.ndarray:
    """Pad (with 0) or truncate a ``[n, L]`` index matrix to ``[n, width]``."""
    if rows.shape[1] >= width:
        return np.ascontiguousarray(rows[:, :width])
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])))


def blend(
    lists: Sequence[tuple[str, np.ndarray, np.ndarray]], exclude: np.ndarray, limit: int, num_items: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Interleave ranked lists rank by rank, de-duplicate, drop ``exclude``; per-source score columns.

    Returns candidate item indices (at most ``limit``) and, per source, a float array aligned with
    them holding the source's score, NaN where the source did not propose the item.
    """
    if not lists:
        return np.zeros(0, dtype=np.int64), {}
    items = np.concatenate([np.asarray(it, dtype=np.int64) for _, it, _ in lists])
    rank = np.concatenate([np.arange(len(it)) for _, it, _ in lists])
    src = np.concatenate([np.full(len(it), s) for s, (_, it, _) in enumerate(lists)])
    scores = np.concatenate([np.asarray(sc, dtype=np.float32) for _, _, sc in lists])
    valid = (items > 0) & (items <= num_items)
    if len(exclude):
        valid &= ~np.isin(items, exclude)
    items, rank, src, scores = items[valid], rank[valid], src[valid], scores[valid]
    order = np.lexsort((src, rank))  # rank first, then source order
    uniq, first = np.unique(items[order], return_index=True)
    chosen = uniq[np.argsort(first, kind="stable")][:limit]
    # position of every proposed item in `chosen` (-1: cut by the limit)
    by_value = np.argsort(chosen, kind="stable")
    slot = np.searchsorted(chosen[by_value], items)
    slot = np.minimum(slot, max(len(chosen) - 1, 0))
    hit = (chosen[by_value][slot] == items) if len(chosen) else np.zeros(len(items), dtype=bool)
    position = np.where(hit, by_value[slot] if len(chosen) else 0, -1)
    columns = {}
    for s, (name, _, _) in enumerate(lists):
        col = np.full(len(chosen), np.nan, dtype=np.float32)
        m = (src == s) & (position >= 0)
        col[position[m][::-1]] = scores[m][::-1]  # reversed: a source's first mention of an item wins
        columns[name] = col
    return chosen, columns


def mmr_rerank(
    relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy MMR: positions of the ``k`` picks, their MMR scores and max similarity to earlier picks.

    ``mmr(i) = (1 - diversity) * relevance[i] - diversity * max_{j picked} cos(v_i, v_j)``; the
    first pick has no earlier item (similarity 0). ``vectors`` are unit rows (or zero rows).
    """
    n = len(relevance)
    k = min(k, n)
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
    rel = np.asarray(relevance, dtype=np.float64)
    if diversity <= 0:
        order = np.argsort(-rel, kind="stable")[:k]
        return order, rel[order], np.zeros(k)
    v = np.asarray(vectors, dtype=np.float32)
    max_sim = np.zeros(n)
    picked = np.zeros(n, dtype=bool)
    order = np.empty(k, dtype=np.int64)
    scores = np.empty(k)
    sims = np.empty(k)
    for step in range(k):
        mmr = (1.0 - diversity) * rel - diversity * max_sim
        mmr[picked] = -np.inf
        best = int(np.argmax(mmr))
        order[step], scores[step], sims[step] = best, mmr[best], max_sim[best]
        picked[best] = True
        max_sim = np.maximum(max_sim, v @ v[best]) if step else v @ v[best]
    return order, scores, sims
