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

:meth:`Funnel.recommend_many` runs several requests through the stages together (the server's
compute thread batches concurrent requests, ``serving/batching.py``): one encoder call and one
index search per retrieval source, one ranking call over all their candidates, and blending and MMR
each as one set of array calls over the batch (:func:`blend_many`, :func:`mmr_rerank_many`).
:meth:`Funnel.recommend` is a batch of one, so there is one implementation of the path.
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

    def query(self, users: Sequence[UserContext]) -> np.ndarray:
        """Query vectors ``[len(users), dim]``: one encoder call for all of them."""
        assert self.module is not None
        args = []
        for name in self.inputs:
            if name == "user_features":
                rows = [
                    [u.index if c == "user" else _scalar(u.sparse.get(c, 0)) for c in self.user_columns]
                    for u in users
                ]
                args.append(torch.tensor(rows, dtype=torch.int64).reshape(len(users), len(self.user_columns)))
            else:
                length = self._length(name, 20 if name == "history" else 50)
                seq = np.zeros((len(users), length), dtype=np.int64)
                for i, u in enumerate(users):
                    recent = u.recent[-length:]
                    if name == "history":
                        seq[i, : len(recent)] = recent
                    else:  # sequence models read a left-padded sequence, newest item last
                        seq[i, length - len(recent) :] = recent
                args.append(torch.from_numpy(seq))
        with torch.inference_mode():
            return self.module(*args).float().numpy()

    def search(self, queries: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``n`` nearest items of each query row (one index search), as (item indices, scores)."""
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
        out = []
        for row, score in zip(rows, scores, strict=True):
            ok = row >= 0
            items = self.row_item[row[ok]]
            known = items > 0
            out.append((items[known], score[ok][known]))
        return out


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
    def _retrieve(
        self, reqs: Sequence[RecommendRequest], users: Sequence[UserContext], excludes: Sequence[np.ndarray]
    ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Each request's candidates and per-source scores; one encoder call and one search per source."""
        cfg = self.config
        lists: list[list[tuple[str, np.ndarray, np.ndarray]]] = [[] for _ in reqs]
        retrieving = [i for i, req in enumerate(reqs) if req.candidates is None]
        for r in self.retrievers:
            who = [i for i in retrieving if r.wants(users[i])]
            if who:
                found = r.search(r.query([users[i] for i in who]), cfg.per_source)
                for i, (items, scores) in zip(who, found, strict=True):
                    lists[i].append((r.name, items, scores))
        # a session signal (recent items sent with the request) or a cold-start user's only signal;
        # a known user's stored history already feeds the retrieval encoders
        seeds: dict[int, np.ndarray] = {}
        for i in retrieving:
            user = users[i]
            if len(user.recent) and (user.sent_recent or user.index == 0):
                seed = self.item_vectors[user.recent[-cfg.similar_recent_items :]].mean(axis=0)
                if np.any(seed):
                    seeds[i] = seed
        if seeds:
            found = self.nearest(np.stack(list(seeds.values())), cfg.per_source)
            for i, (items, scores) in zip(seeds, found, strict=True):
                lists[i].append((SIMILAR_TO_RECENT, items, scores))
        blends: list[tuple[list[tuple[str, np.ndarray, np.ndarray]], np.ndarray, int]] = []
        for i, req in enumerate(reqs):
            if req.candidates is None:
                n_trend = cfg.trending_known if users[i].index > 0 else cfg.trending_cold
                lists[i].append((TRENDING, self.trending[:n_trend], self.trending_scores[:n_trend]))
                blends.append((lists[i], excludes[i], cfg.max_candidates))
                continue
            given = self.items.ids.lookup(req.candidates)
            given = given[given > 0]
            _, first = np.unique(given, return_index=True)
            given = given[np.sort(first)]
            request = [(REQUEST, given, np.arange(len(given), dtype=np.float32))]
            blends.append((request, excludes[i], len(given)))
        return blend_many(blends, len(self.items))

    # -- ranking ---------------------------------------------------------------------------------
    def _rank(
        self, reqs: Sequence[RecommendRequest], users: Sequence[UserContext], cands: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """p(click) of every request's candidates: one model call over all of them, split back."""
        counts = np.array([len(c) for c in cands], dtype=np.int64)
        if not counts.sum():
            return [np.zeros(0, dtype=np.float32) for _ in cands]
        dense, sparse = self._inputs(reqs, users, cands, counts)
        return np.split(self.ranking.score(dense, sparse), np.cumsum(counts)[:-1])

    def _inputs(
        self,
        reqs: Sequence[RecommendRequest],
        users: Sequence[UserContext],
        cands: Sequence[np.ndarray],
        counts: np.ndarray,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Model inputs of the concatenated candidates: item columns gathered, request columns repeated."""
        cand = np.concatenate(cands)
        sparse: list[np.ndarray] = []
        for f in self.ranking.sparse:
            name, side, multi = f["name"], f["side"], f["multi_valued"]
            width = int(f.get("max_len") or 1)
            if side == "item":
                col = cand if f.get("column") is None else self.items.sparse[name][cand]
            elif side == "user":
                col = _repeat(
                    [
                        np.asarray(u.index if f.get("column") is None else u.sparse.get(name, 0))
                        for u in users
                    ],
                    counts,
                    multi,
                    width,
                )
            else:
                col = _repeat([self._context_indices(f, req) for req in reqs], counts, multi, width)
            if multi and col.shape[1] != width:
                col = _fit_width(col, width)
            sparse.append(col)
        rows = np.stack([self._dense_row(req, user) for req, user in zip(reqs, users, strict=True)])
        dense = np.repeat(rows, counts, axis=0)
        if self.items.dense is not None:
            item_dense = self.items.dense[cand]
            for j, name in enumerate(self.items.dense_names):
                spec = next((f for f in self.ranking.dense if f["name"] == name), None)
                if spec is not None:
                    dense[:, spec["index"]] = item_dense[:, j]
        return dense, sparse

    def _context_indices(self, feature: dict[str, Any], req: RecommendRequest) -> np.ndarray:
        raw = req.context.get(feature["name"])
        if raw is None:
            return np.zeros(0, dtype=np.int64)
        return self.ranking.encoders[feature["name"]].encode(raw if isinstance(raw, list) else [raw])

    def _dense_row(self, req: RecommendRequest, user: UserContext) -> np.ndarray:
        """The request- and user-side dense inputs (item-side columns are filled per candidate)."""
        row = self.ranking.context_dense({k: v for k, v in req.context.items() if k in self.context_dense})
        for f in self.ranking.dense:
            if f["side"] == "user" and f["name"] in user.dense:
                row[f["index"]] = user.dense[f["name"]]
        return row

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

    # -- requests --------------------------------------------------------------------------------
    def recommend(self, req: RecommendRequest) -> dict[str, Any]:
        """The answer to one request (a batch of one); raises :class:`RequestError`."""
        answer = self.recommend_many([req])[0]
        if isinstance(answer, RequestError):
            raise answer
        return answer

    def recommend_many(
        self, reqs: Sequence[RecommendRequest], arrived: Sequence[float] | None = None
    ) -> list[dict[str, Any] | RequestError]:
        """The answers to ``reqs``, computed together, in order; a request the bundle cannot serve
        gets its :class:`RequestError` in its slot and the others are answered.

        Together: one encoder call and one index search per retrieval source, one matrix product
        for similar_to_recent, one ranking call over every request's candidates, one blend and one
        MMR over the batch. Each answer is the one the request gets alone, up to the float rounding
        of the batched products (~1e-7).
        ``arrived`` (``time.perf_counter()`` when each request came in) adds the time it waited for
        its batch as ``latency_ms.queue``, part of ``total``; the stage times are the batch's.
        """
        started = time.perf_counter()
        answers: list[dict[str, Any] | RequestError] = []
        live: list[int] = []
        users: list[UserContext] = []
        excludes: list[np.ndarray] = []
        for req in reqs:
            try:
                self._check_request(req)
                user = self._user(req)
            except RequestError as e:
                answers.append(e)
                continue
            exclude = self.items.ids.lookup(req.exclude)
            if req.exclude_recent:
                exclude = np.concatenate([exclude, user.recent])
            answers.append({})
            live.append(len(answers) - 1)
            users.append(user)
            excludes.append(exclude)
        batch = [reqs[i] for i in live]
        retrieved = self._retrieve(batch, users, excludes)
        t_retrieval = time.perf_counter()
        cands = [cand for cand, _ in retrieved]
        probs = self._rank(batch, users, cands)
        t_ranking = time.perf_counter()
        reranked = mmr_rerank_many(
            probs, [self.item_vectors[c] for c in cands], [r.k for r in batch], [r.diversity for r in batch]
        )
        t_rerank = time.perf_counter()
        stages = {
            "retrieval": 1000 * (t_retrieval - started),
            "ranking": 1000 * (t_ranking - t_retrieval),
            "rerank": 1000 * (t_rerank - t_ranking),
        }
        for j, i in enumerate(live):
            answers[i] = self._answer(users[j], retrieved[j], probs[j], reranked[j], len(live))
        finished = time.perf_counter()
        for i in live:
            came = started if arrived is None else min(arrived[i], started)
            latency = {"queue": 1000 * (started - came), **stages, "total": 1000 * (finished - came)}
            answers[i]["latency_ms"] = latency  # type: ignore[index]
        return answers

    def _answer(
        self,
        user: UserContext,
        retrieved: tuple[np.ndarray, dict[str, np.ndarray]],
        probs: np.ndarray,
        reranked: tuple[np.ndarray, np.ndarray, np.ndarray],
        batch: int,
    ) -> dict[str, Any]:
        cand, source_scores = retrieved
        order, mmr, max_sim = reranked
        raw = self.items.ids.raw_ids(cand[order]) if len(order) else []
        # Python floats column by column: one conversion per array, not one per value
        retrieval = {s: v[order].tolist() for s, v in source_scores.items()}
        ranking, rerank, similarity = probs[order].tolist(), mmr.tolist(), max_sim.tolist()
        results = []
        for pos, item_id in enumerate(raw):
            results.append(
                {
                    "item_id": item_id,
                    "score": rerank[pos],
                    "stages": {
                        # NaN: the source did not propose the item (NaN != NaN)
                        "retrieval": {s: c[pos] for s, c in retrieval.items() if c[pos] == c[pos]},
                        "ranking": ranking[pos],
                        "rerank": rerank[pos],
                        "max_similarity": similarity[pos],
                    },
                }
            )
        return {
            "items": results,
            "user_known": user.index > 0,
            "cold_start": user.index == 0,
            "candidates": int(len(cand)),
            "sources": {s: int((~np.isnan(v)).sum()) for s, v in source_scores.items()},
            "bundle": self.version,
            "batch": batch,
        }

    def nearest(self, vectors: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row of ``vectors``, the ``n`` items of highest inner product (exact; one matrix
        product for all rows), best first, as (item indices, scores)."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.item_vectors.shape[1])
        # items x queries, then transposed: OpenBLAS is ~2x faster with the item matrix on the left
        scores = np.ascontiguousarray((self.item_vectors[1:] @ queries.T).T)
        n = min(n, scores.shape[1])
        if n <= 0:
            return [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)) for _ in scores]
        out = []
        for row, top in zip(scores, np.argpartition(-scores, n - 1, axis=1)[:, :n], strict=True):
            top = top[np.argsort(-row[top], kind="stable")]
            out.append((top + 1, row[top]))
        return out

    def similar(self, item_id: str | int, k: int) -> dict[str, Any]:
        index = int(self.items.ids.lookup([item_id])[0])
        if index == 0:
            raise KeyError(item_id)
        raw = self.items.ids.raw_ids(np.array([index]))[0]
        vector = self.item_vectors[index]
        if not np.any(vector):
            return {"item_id": raw, "items": []}
        items, sims = self.nearest(vector, k + 1)[0]
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


def _repeat(values: Sequence[np.ndarray], counts: np.ndarray, multi: bool, width: int) -> np.ndarray:
    """One value per request, repeated for each of its ``counts`` candidates (rows of ``width`` if multi)."""
    if multi:
        rows = [_fit_width(np.asarray(v, dtype=np.int64).reshape(1, -1), width) for v in values]
        return np.repeat(np.concatenate(rows), counts, axis=0)
    return np.repeat(np.array([_scalar(v) for v in values], dtype=np.int64), counts)


def _fit_width(rows: np.ndarray, width: int) -> np.ndarray:
    """Pad (with 0) or truncate a ``[n, L]`` index matrix to ``[n, width]``."""
    if rows.shape[1] >= width:
        return np.ascontiguousarray(rows[:, :width])
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])))


Lists = Sequence[tuple[str, np.ndarray, np.ndarray]]


def blend(
    lists: Lists, exclude: np.ndarray, limit: int, num_items: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Interleave ranked lists rank by rank, de-duplicate, drop ``exclude``; per-source score columns.

    Returns candidate item indices (at most ``limit``) and, per source, a float array aligned with
    them holding the source's score, NaN where the source did not propose the item.
    """
    return blend_many([(lists, exclude, limit)], num_items)[0]


def blend_many(
    requests: Sequence[tuple[Lists, np.ndarray, int]], num_items: int
) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """:func:`blend` of several requests' ``(lists, exclude, limit)`` with one set of array calls.

    Why batched: a request's lists hold a few hundred items, so blending one costs ~40 numpy calls
    of overhead for little work; the batch's proposals are keyed ``request * (num_items + 1) + item``
    and blended together, each request's answer the one it gets alone.
    """
    width = num_items + 1
    proposals = [
        (r, s, np.asarray(it, dtype=np.int64), np.asarray(sc, dtype=np.float32))
        for r, (lists, _, _) in enumerate(requests)
        for s, (_, it, sc) in enumerate(lists)
    ]
    sizes = np.array([len(it) for _, _, it, _ in proposals], dtype=np.int64)
    items = np.concatenate([_EMPTY, *(it for _, _, it, _ in proposals)])
    scores = np.concatenate([_NO_SCORES, *(sc for _, _, _, sc in proposals)])
    req = np.repeat(np.array([r for r, _, _, _ in proposals], dtype=np.int64), sizes)
    src = np.repeat(np.array([s for _, s, _, _ in proposals], dtype=np.int64), sizes)
    rank = np.arange(len(items)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    key = req * width + items
    valid = (items > 0) & (items <= num_items)
    excluded = [r * width + e[(e > 0) & (e <= num_items)] for r, (_, e, _) in enumerate(requests) if len(e)]
    if excluded:
        valid &= ~np.isin(key, np.concatenate(excluded))
    key, req, src, rank, scores = key[valid], req[valid], src[valid], rank[valid], scores[valid]
    # first appearances in (request, rank, source) order: each request's interleaving
    order = np.lexsort((src, rank, req))
    uniq, first = np.unique(key[order], return_index=True)
    chosen = uniq[np.argsort(first, kind="stable")]  # grouped by request, in interleaving order
    chosen_req = chosen // width
    requests_at = np.arange(len(requests))
    starts = np.searchsorted(chosen_req, requests_at)
    limits = np.array([limit for _, _, limit in requests], dtype=np.int64)
    keep = np.arange(len(chosen)) - starts[chosen_req] < limits[chosen_req]
    chosen, chosen_req = chosen[keep], chosen_req[keep]
    starts = np.searchsorted(chosen_req, requests_at)
    ends = np.searchsorted(chosen_req, requests_at, side="right")
    # each proposal's row among the chosen (-1: excluded or cut by a limit)
    by_key = np.argsort(chosen)
    slot = np.minimum(np.searchsorted(chosen[by_key], key), max(len(chosen) - 1, 0))
    hit = chosen[by_key][slot] == key if len(chosen) else np.zeros(len(key), dtype=bool)
    row = np.where(hit, by_key[slot] if len(chosen) else 0, -1)
    # a source's first mention of an item gives its score: proposals are in (request, source, rank)
    # order, so the first index of each (request, item, source) is that mention
    sources = max((len(lists) for lists, _, _ in requests), default=0)
    mentioned = np.flatnonzero(row >= 0)
    _, first_mention = np.unique(key[mentioned] * max(sources, 1) + src[mentioned], return_index=True)
    mentioned = mentioned[first_mention]
    columns = np.full((len(chosen), sources), np.nan, dtype=np.float32)
    columns[row[mentioned], src[mentioned]] = scores[mentioned]
    out = []
    for r, (lists, _, _) in enumerate(requests):
        s, e = int(starts[r]), int(ends[r])
        picked = chosen[s:e] - r * width
        out.append((picked, {name: columns[s:e, j] for j, (name, _, _) in enumerate(lists)}))
    return out


_EMPTY = np.zeros(0, dtype=np.int64)
_NO_SCORES = np.zeros(0, dtype=np.float32)


def mmr_rerank(
    relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy MMR: positions of the ``k`` picks, their MMR scores and max similarity to earlier picks.

    ``mmr(i) = (1 - diversity) * relevance[i] - diversity * max_{j picked} cos(v_i, v_j)``; the
    first pick has no earlier item (similarity 0). ``vectors`` are unit rows (or zero rows).
    """
    return mmr_rerank_many([relevance], [vectors], [k], [diversity])[0]


def mmr_rerank_many(
    relevance: Sequence[np.ndarray],
    vectors: Sequence[np.ndarray],
    k: Sequence[int],
    diversity: Sequence[float],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`mmr_rerank` of several requests, their greedy steps taken together.

    Why batched: each step is a few array calls over a couple of hundred candidates, so ten steps
    of one request are mostly call overhead; padded to ``[requests, candidates]`` (padding never
    picked), the batch takes ``max(k)`` steps in all.
    """
    picks = [min(n, len(rel)) for n, rel in zip(k, relevance, strict=True)]
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    diverse: list[int] = []
    for i, (rel, n_pick, div) in enumerate(zip(relevance, picks, diversity, strict=True)):
        if n_pick <= 0:
            out.append((np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)))
        elif div <= 0:
            rel = np.asarray(rel, dtype=np.float64)
            order = np.argsort(-rel, kind="stable")[:n_pick]
            out.append((order, rel[order], np.zeros(n_pick)))
        else:
            out.append((_EMPTY, _EMPTY, _EMPTY))
            diverse.append(i)
    if not diverse:
        return out
    width = max(len(relevance[i]) for i in diverse)
    rows = np.arange(len(diverse))
    v = np.zeros((len(diverse), width, vectors[diverse[0]].shape[1]), dtype=np.float32)
    # (1 - diversity) * relevance, -inf where nothing may be picked (padding, then each pick)
    gain = np.full((len(diverse), width), -np.inf)
    for row, i in enumerate(diverse):
        n = len(relevance[i])
        gain[row, :n] = (1.0 - diversity[i]) * np.asarray(relevance[i], dtype=np.float64)
        v[row, :n] = vectors[i]
    div = np.array([diversity[i] for i in diverse])[:, None]
    steps = max(picks[i] for i in diverse)
    max_sim = np.zeros((len(diverse), width))
    order = np.empty((len(diverse), steps), dtype=np.int64)
    scores = np.empty((len(diverse), steps))
    sims = np.empty((len(diverse), steps))
    for step in range(steps):
        mmr = gain - div * max_sim
        best = np.argmax(mmr, axis=1)
        order[:, step], scores[:, step], sims[:, step] = best, mmr[rows, best], max_sim[rows, best]
        gain[rows, best] = -np.inf
        sim = np.matmul(v, v[rows, best][:, :, None])[:, :, 0]
        max_sim = np.maximum(max_sim, sim) if step else sim.astype(np.float64)
    for row, i in enumerate(diverse):
        out[i] = (order[row, : picks[i]], scores[row, : picks[i]], sims[row, : picks[i]])
    return out
