"""The serving shim end to end: trained models -> bundle -> `funnel serve` subprocess -> HTTP on loopback.

Guarded here: importing ``serving`` pulls in no training code; the funnel answers known and
unknown users (two-tower ANN, similar-to-recent, trending -> DeepFM -> MMR) with per-stage scores and
latencies; served ranking scores equal the training-time model's; bad input gets a 4xx naming the
field and no input at all gets a 5xx (hypothesis); tampered bundles are refused at start and at
reload while the old bundle keeps serving; a reload under traffic loses no request; a request
batched with others (cross-request batching on the compute thread) gets the answer it gets alone,
a batch never mixes bundles, and the compute thread runs on the configured threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import faiss
import httpx
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine import torchrun, write_config

from data.ctr import CTRBatchBuilder
from data.shards import PreparedDataset
from serving.app import create_app
from serving.batching import FAISS_BLAS_THRESHOLD, BatchConfig, Batcher
from serving.bundle import BundleError
from serving.compute import ComputeProcesses
from serving.funnel import (
    Funnel,
    FunnelConfig,
    RecommendRequest,
    RequestError,
    blend,
    blend_many,
    mmr_rerank,
    mmr_rerank_many,
)
from trainer.config import load_config
from trainer.export_bundle import export_bundle
from trainer.export_ranking import export_ranking, load_training_model
from trainer.faiss_export import IndexConfig
from trainer.retrieval import export_from_config
from trainer.sequential import export_sasrec

REPO = Path(__file__).resolve().parents[1]
TWO_TOWER = {
    "user_features": ["user", "age_bucket", "gender", "occupation", "region"],
    "item_features": ["item", "category", "price_bucket", "tags"],
    "history_length": 10, "embedding_dim": 16, "user_arch": [32], "item_arch": [32], "output_dim": 16,
}  # fmt: skip
SASREC = {"embedding_dim": 16, "max_len": 20, "num_blocks": 1, "num_heads": 1, "dropout": 0.1, "loss": "ce",
          "ks": [10]}  # fmt: skip
TRAINING_ONLY = (
    "trainer",
    "data",
    "models",
    "torchrec",
    "fbgemm_gpu",
    "pytorch_lightning",
    "lightning_fabric",
)


def test_importing_serving_pulls_in_no_training_code() -> None:
    code = (
        "import sys, serving, serving.app, serving.funnel, serving.ranking, serving.pt2, serving.features, "
        "serving.metrics, serving.bundle\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_ONLY!r})\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(bundle: Path, port: int, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "launch", "serve", str(bundle), "--port", str(port), *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen[str], url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited ({proc.returncode}):\n{proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not become ready")


def _reference_blend(
    lists: list[tuple[str, list[int], list[float]]], exclude: set[int], limit: int, num_items: int
) -> tuple[list[int], dict[str, list[float]]]:
    """``blend`` spelled out: rank by rank, sources in order, first mention kept."""
    chosen: list[int] = []
    for rank in range(max((len(items) for _, items, _ in lists), default=0)):
        for _, items, _ in lists:
            if rank < len(items):
                item = items[rank]
                if 0 < item <= num_items and item not in exclude and item not in chosen:
                    chosen.append(item)
    chosen = chosen[:limit]
    columns = {}
    for name, items, scores in lists:
        first = {}
        for item, score in zip(items, scores, strict=True):
            first.setdefault(item, score)
        columns[name] = [first.get(item, float("nan")) for item in chosen]
    return chosen, columns


_ITEM_LISTS = st.lists(
    st.lists(st.tuples(st.integers(-1, 25), st.floats(-5, 5, width=32)), max_size=15), min_size=1, max_size=3
)


@given(lists=_ITEM_LISTS, exclude=st.sets(st.integers(0, 25), max_size=6), limit=st.integers(0, 40))
@settings(max_examples=300, deadline=None)
def test_blend_interleaves_dedupes_and_keeps_each_sources_first_score(
    lists: list[list[tuple[int, float]]], exclude: set[int], limit: int
) -> None:
    named = [(f"s{i}", [x for x, _ in pairs], [y for _, y in pairs]) for i, pairs in enumerate(lists)]
    arrays = [(n, np.array(it, dtype=np.int64), np.array(sc, dtype=np.float32)) for n, it, sc in named]
    chosen, columns = blend(arrays, np.array(sorted(exclude), dtype=np.int64), limit, num_items=20)
    want, want_columns = _reference_blend(named, exclude, limit, num_items=20)
    assert chosen.tolist() == want
    assert set(columns) == set(want_columns)
    for name, column in columns.items():
        np.testing.assert_array_equal(column, np.array(want_columns[name], dtype=np.float32))


@given(
    requests=st.lists(
        st.tuples(_ITEM_LISTS, st.sets(st.integers(0, 25), max_size=6), st.integers(0, 40)), max_size=5
    )
)
@settings(max_examples=200, deadline=None)
def test_blend_many_answers_each_request_as_if_alone(
    requests: list[tuple[list[list[tuple[int, float]]], set[int], int]],
) -> None:
    batch, wanted = [], []
    for lists, exclude, limit in requests:
        named = [(f"s{i}", [x for x, _ in pairs], [y for _, y in pairs]) for i, pairs in enumerate(lists)]
        arrays = [(n, np.array(it, dtype=np.int64), np.array(sc, dtype=np.float32)) for n, it, sc in named]
        batch.append((arrays, np.array(sorted(exclude), dtype=np.int64), limit))
        wanted.append(_reference_blend(named, exclude, limit, num_items=20))
    answers = blend_many(batch, num_items=20)
    assert len(answers) == len(requests)
    for (chosen, columns), (want, want_columns) in zip(answers, wanted, strict=True):
        assert chosen.tolist() == want
        assert set(columns) == set(want_columns)
        for name, column in columns.items():
            np.testing.assert_array_equal(column, np.array(want_columns[name], dtype=np.float32))


def _check_greedy_mmr(
    relevance: list[float],
    v: np.ndarray,
    k: int,
    diversity: float,
    answer: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    order, scores, sims = answer
    assert len(order) == min(k, len(relevance)) == len(set(order.tolist()))
    picked: list[int] = []
    for step, choice in enumerate(order.tolist()):

        def mmr(i: int) -> tuple[float, float]:
            sim = max((float(v[i] @ v[j]) for j in picked), default=0.0)
            return (1 - diversity) * relevance[i] - diversity * sim, sim

        best = max(mmr(i)[0] for i in range(len(relevance)) if i not in picked)
        score, sim = mmr(choice)
        # the pick attains the greedy maximum (either of two tied items may be taken)
        assert choice not in picked and score == pytest.approx(best, abs=1e-6)
        assert scores[step] == pytest.approx(score, abs=1e-6)
        assert sims[step] == pytest.approx(sim if diversity > 0 else 0.0, abs=1e-6)
        picked.append(choice)


def _unit_rows(rng: np.random.Generator, n: int, dim: int = 4) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@given(
    relevance=st.lists(st.floats(0, 1), min_size=1, max_size=12),
    k=st.integers(1, 14),
    diversity=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    seed=st.integers(0, 1000),
)
@settings(max_examples=200, deadline=None)
def test_mmr_picks_greedily_by_relevance_against_max_similarity(
    relevance: list[float], k: int, diversity: float, seed: int
) -> None:
    v = _unit_rows(np.random.default_rng(seed), len(relevance))
    _check_greedy_mmr(relevance, v, k, diversity, mmr_rerank(np.array(relevance), v, k, diversity))


@given(
    requests=st.lists(
        st.tuples(
            st.lists(st.floats(0, 1), max_size=12),
            st.integers(0, 14),
            st.sampled_from([0.0, 0.2, 0.5, 1.0]),
        ),
        max_size=5,
    ),
    seed=st.integers(0, 1000),
)
@settings(max_examples=200, deadline=None)
def test_mmr_many_picks_greedily_for_each_request_of_a_padded_batch(
    requests: list[tuple[list[float], int, float]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    vectors = [_unit_rows(rng, len(relevance)) for relevance, _, _ in requests]
    answers = mmr_rerank_many(
        [np.array(r, dtype=np.float64) for r, _, _ in requests],
        vectors,
        [k for _, k, _ in requests],
        [d for _, _, d in requests],
    )
    assert len(answers) == len(requests)
    for (relevance, k, diversity), v, answer in zip(requests, vectors, answers, strict=True):
        _check_greedy_mmr(relevance, v, k, diversity, answer)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny world; DeepFM, two-tower and SASRec trained on 2 ranks; two bundles; a server on bundle A.

    Bundle A: fp32 ranking + two-tower + SASRec; bundle B: int8 ranking + two-tower (the reload target).
    """
    from data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("serving")
    world = prepare_synthetic(root / "tiny", "tiny", seed=0)
    deepfm_cfg = write_config(
        root / "deepfm.yaml",
        world,
        root / "deepfm",
        trainer={"checkpoint_every_n_steps": None, "test_after_fit": False},
    )
    torchrun(2, ["--config", str(deepfm_cfg)])
    common = {
        "optimizer": {"name": "adam", "lr": 0.003},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "test_after_fit": False},
        "logger": {"kind": "csv"},
    }
    recipes = {
        "two_tower": {"model": TWO_TOWER, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
                      "data": {"path": str(world), "batch_size": 256, "eval_batch_size": 512}},
        "sasrec": {"model": SASREC, "sparse_optimizer": {"name": "adagrad", "lr": 0.05},
                   "data": {"path": str(world), "batch_size": 128, "eval_batch_size": 256}},
    }  # fmt: skip
    configs = {}
    for name, recipe in recipes.items():
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(
            yaml.safe_dump({"model_name": name, **common, **recipe, "run_dir": str(root / name)})
        )
        torchrun(2, ["--config", str(configs[name])])
    checkpoint = root / "deepfm/checkpoints/final.ckpt"
    export_ranking(checkpoint, deepfm_cfg, root / "rank-fp32", "fp32", eval_rows=200)
    export_ranking(checkpoint, deepfm_cfg, root / "rank-int8", "int8", eval_rows=200)
    flat = IndexConfig(kind="flat")
    export_from_config(configs["two_tower"], root / "two_tower/checkpoints/final.ckpt", root / "tt", flat)
    export_sasrec(root / "sasrec/checkpoints/final.ckpt", configs["sasrec"], root / "sr", "flat")
    retrieval = {"two_tower": root / "tt", "sasrec": root / "sr"}
    export_bundle(root / "rank-fp32", retrieval, world, root / "bundle-a")
    export_bundle(root / "rank-int8", {"two_tower": root / "tt"}, world, root / "bundle-b")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(root / "bundle-a", port)
    try:
        _wait_ready(proc, url)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {
                "root": root,
                "world": world,
                "url": url,
                "client": client,
                "deepfm_cfg": deepfm_cfg,
                "checkpoint": checkpoint,
                "proc": proc,
            }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _users_items(world: Path) -> tuple[list[str], list[str]]:
    ds = PreparedDataset(world)
    return ds.idmap("user").tolist(), ds.idmap("item").tolist()


@pytest.mark.slow
def test_known_user_gets_the_whole_funnel(stack: Any) -> None:
    client = stack["client"]
    users, items = _users_items(stack["world"])
    r = client.post("/recommend", json={"user_id": users[3], "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_known"] and not body["cold_start"]
    assert set(body["sources"]) == {"two_tower", "sasrec", "trending"}  # sasrec: the stored history
    assert body["candidates"] >= 10
    ids = [x["item_id"] for x in body["items"]]
    assert len(ids) == 10 == len(set(ids)) and set(ids) <= set(items)
    for x in body["items"]:
        assert x["stages"]["retrieval"] and 0.0 < x["stages"]["ranking"] < 1.0
    ranking = [x["stages"]["ranking"] for x in body["items"]]
    assert ranking == sorted(ranking, reverse=True), "diversity 0 must be the ranking order"
    assert all(body["latency_ms"][s] > 0 for s in ("retrieval", "ranking", "rerank", "total"))

    excluded = client.post("/recommend", json={"user_id": users[3], "k": 10, "exclude": ids[:3]}).json()
    assert not set(ids[:3]) & {x["item_id"] for x in excluded["items"]}
    session = client.post("/recommend", json={"user_id": users[3], "k": 10, "recent_items": items[:2]}).json()
    assert set(session["sources"]) == {"two_tower", "sasrec", "similar_to_recent", "trending"}

    diverse = client.post("/recommend", json={"user_id": users[3], "k": 10, "diversity": 0.7}).json()
    assert len(diverse["items"]) == 10
    vectors = np.load(stack["root"] / "bundle-a/items/embeddings.npy")
    index = {raw: i + 1 for i, raw in enumerate(items)}

    def mean_pairwise(result: dict[str, Any]) -> float:
        v = vectors[[index[x["item_id"]] for x in result["items"]]]
        sim = v @ v.T
        return float((sim.sum() - np.trace(sim)) / (len(v) * (len(v) - 1)))

    assert mean_pairwise(diverse) < mean_pairwise(body)


@pytest.mark.slow
def test_unknown_users_get_a_cold_start_answer(stack: Any) -> None:
    client = stack["client"]
    _, items = _users_items(stack["world"])
    empty = client.post("/recommend", json={})
    assert empty.status_code == 200 and empty.json()["cold_start"] and len(empty.json()["items"]) == 10
    assert set(empty.json()["sources"]) == {"trending"}
    recent = items[10:14]
    r = client.post("/recommend", json={"user_id": "nobody-like-this", "recent_items": recent, "k": 7})
    body = r.json()
    assert r.status_code == 200 and body["cold_start"] and not body["user_known"]
    assert set(body["sources"]) == {"two_tower", "sasrec", "similar_to_recent", "trending"}
    assert len(body["items"]) == 7 and not set(recent) & {x["item_id"] for x in body["items"]}
    features = client.post(
        "/recommend", json={"user_features": {"age_bucket": "25-34", "gender": "F"}, "k": 5}
    )
    assert features.status_code == 200 and set(features.json()["sources"]) == {"two_tower", "trending"}


@pytest.mark.slow
def test_served_ranking_scores_equal_the_training_time_model(stack: Any) -> None:
    ds = PreparedDataset(stack["world"])
    model, dm = load_training_model(load_config(stack["deepfm_cfg"]), stack["checkpoint"])
    rows = ds.split_rows("ctr", "test")[:25]
    batch = CTRBatchBuilder(dm.dataset, dm.schema)(rows)
    with torch.no_grad():
        expected = torch.sigmoid(model(batch.dense_features, batch.sparse_features)).numpy()
    names = list(ds.tables["ctr"].columns["dense"].names or [])
    spec = json.loads((stack["root"] / "bundle-a/ranking/deepfm/feature_spec.json").read_text())
    context_names = [f["name"] for f in spec["dense"] if f["side"] == "context"]
    users, items = ds.idmap("user"), ds.idmap("item")
    dense = np.asarray(ds.column("ctr", "dense"))
    served = []
    for row in rows.tolist():
        body = {
            "user_id": str(users[ds.column("ctr", "user")[row] - 1]),
            "candidates": [str(items[ds.column("ctr", "item")[row] - 1])],
            "context": {n: float(dense[row, names.index(n)]) for n in context_names},
            "exclude_recent": False,
            "k": 1,
        }
        r = stack["client"].post("/recommend", json=body)
        assert r.status_code == 200, r.text
        served.append(r.json()["items"][0]["stages"]["ranking"])
    assert expected.std() > 0.02
    np.testing.assert_allclose(np.array(served), expected, atol=1e-5)


def _mixed_requests(users: list[str], items: list[str]) -> list[RecommendRequest]:
    """Every path through the funnel (known users, sessions, cold start, features, given candidates)."""
    return [
        RecommendRequest(user_id=users[1], k=10),
        RecommendRequest(user_id=users[2], k=5, diversity=0.4, recent_items=items[3:6]),
        RecommendRequest(user_id="nobody", recent_items=items[10:14], k=7, diversity=0.2),
        RecommendRequest(),
        RecommendRequest(user_features={"age_bucket": "25-34", "gender": "F"}, k=6, exclude=items[:20]),
        RecommendRequest(
            user_id=users[5], candidates=items[30:60], k=8, context={"hour": 0.3}, exclude_recent=False
        ),
        RecommendRequest(user_id=users[7], context={"weather": 1.0}),  # unservable: unknown feature
        *[RecommendRequest(user_id=users[20 + i], k=10, diversity=0.2 * (i % 2)) for i in range(16)],
    ]


def _assert_same_answer(alone: dict[str, Any], batched: dict[str, Any]) -> None:
    assert [x["item_id"] for x in batched["items"]] == [x["item_id"] for x in alone["items"]]
    assert batched["sources"] == alone["sources"] and batched["candidates"] == alone["candidates"]
    assert batched["user_known"] == alone["user_known"] and batched["bundle"] == alone["bundle"]
    for a, b in zip(alone["items"], batched["items"], strict=True):
        for key in ("ranking", "rerank", "max_similarity"):
            assert b["stages"][key] == pytest.approx(a["stages"][key], abs=1e-6), key
        assert b["score"] == pytest.approx(a["score"], abs=1e-6)
        assert b["stages"]["retrieval"].keys() == a["stages"]["retrieval"].keys()
        for source, score in a["stages"]["retrieval"].items():  # inner products, not probabilities
            assert b["stages"]["retrieval"][source] == pytest.approx(score, rel=1e-6, abs=1e-6), source


def _answer(future: Any) -> Any:
    error = future.exception(timeout=60)
    return error if error is not None else future.result()


@pytest.fixture
def batcher() -> Any:
    """A started Batcher; torch's and FAISS's process-wide settings restored afterwards."""
    threads, blas = torch.get_num_threads(), faiss.cvar.distance_compute_blas_threshold
    b = Batcher(BatchConfig(max_batch=64, max_wait_ms=0.0, threads=1))
    b.start()
    try:
        yield b
    finally:
        b.close()
        torch.set_num_threads(threads)
        faiss.cvar.distance_compute_blas_threshold = blas


def _held(batcher: Batcher) -> tuple[threading.Event, Any]:
    """Hold the compute thread until the event is set: what is submitted meanwhile forms one batch."""
    gate = threading.Event()
    return gate, batcher.call(lambda: gate.wait(60))


@pytest.mark.slow
def test_a_request_gets_the_same_answer_alone_and_inside_a_batch(stack: Any, batcher: Batcher) -> None:
    funnel = Funnel.load(stack["root"] / "bundle-a")
    users, items = _users_items(stack["world"])
    reqs = _mixed_requests(users, items)
    assert batcher.call(lambda: (torch.get_num_threads(), faiss.omp_get_max_threads())).result(60) == (1, 1)
    alone = [_answer(batcher.submit(funnel, r)) for r in reqs]  # one at a time: batches of one
    gate, held = _held(batcher)
    futures = [batcher.submit(funnel, r) for r in reqs]
    gate.set()
    held.result(60)
    together = [_answer(f) for f in futures]
    valid = len(reqs) - 1
    dim = max(r.index.d for r in funnel.retrievers)
    assert valid * dim >= FAISS_BLAS_THRESHOLD, "the batch must reach FAISS's batched (BLAS) search"
    for req, a, b in zip(reqs, alone, together, strict=True):
        if "weather" in req.context:  # only the unservable request fails; the rest of its batch is answered
            assert isinstance(a, RequestError) and isinstance(b, RequestError)
            assert a.field == b.field == "context.weather"
            continue
        assert a["batch"] == 1 and b["batch"] == valid
        assert a["items"], "every path must return items"
        _assert_same_answer(a, b)
        assert set(b["latency_ms"]) == {"queue", "retrieval", "ranking", "rerank", "total"}
        assert b["latency_ms"]["total"] >= b["latency_ms"]["queue"] >= 0
    # the one-request path (Funnel.recommend, used by the smoke test at load) is a batch of one
    _assert_same_answer(funnel.recommend(reqs[2]), together[2])


@pytest.mark.slow
def test_a_batch_never_mixes_bundles_and_skips_cancelled_requests(stack: Any, batcher: Batcher) -> None:
    a = Funnel.load(stack["root"] / "bundle-a")
    b = Funnel.load(stack["root"] / "bundle-b")
    assert a.version != b.version
    users, _ = _users_items(stack["world"])
    gate, held = _held(batcher)
    futures = [batcher.submit(a if i % 2 else b, RecommendRequest(user_id=users[i], k=4)) for i in range(8)]
    gone = batcher.submit(a, RecommendRequest(k=3))
    assert gone.cancel()  # its client went away before the batch ran
    gate.set()
    held.result(60)
    for i, future in enumerate(futures):
        answer = future.result(60)
        # the requests of each bundle ran as their own group of the batch, on their own bundle
        assert answer["bundle"] == (a if i % 2 else b).version and answer["batch"] == 4
        _assert_same_answer((a if i % 2 else b).recommend(RecommendRequest(user_id=users[i], k=4)), answer)
    assert gone.cancelled()


@pytest.mark.slow
def test_concurrent_http_requests_are_batched_and_answered_as_alone(stack: Any) -> None:
    users, items = _users_items(stack["world"])
    bodies = [{"user_id": users[40 + i], "k": 8, "diversity": 0.3 * (i % 2)} for i in range(10)]
    bodies += [{"user_id": f"new-{i}", "recent_items": items[5 * i : 5 * i + 3], "k": 5} for i in range(6)]
    alone = [stack["client"].post("/recommend", json=b).json() for b in bodies]
    answers: list[list[dict[str, Any]]] = [[] for _ in bodies]
    start = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        with httpx.Client(base_url=stack["url"], timeout=60) as c:
            start.wait(60)
            for _ in range(3):
                r = c.post("/recommend", json=bodies[i])
                assert r.status_code == 200, r.text
                answers[i].append(r.json())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(len(a) == 3 for a in answers), "a request was lost"
    for a, got in zip(alone, answers, strict=True):
        for b in got:
            _assert_same_answer(a, b)
    assert max(b["batch"] for got in answers for b in got) > 1, "concurrent requests were never batched"
    text = stack["client"].get("/metrics").text
    assert "funnel_batch_size_bucket" in text and 'funnel_stage_duration_seconds_count{stage="queue"}' in text


def test_serve_refuses_out_of_range_batching_flags(tmp_path: Path) -> None:
    for flags, message in (
        (["--max-batch", "0"], "--max-batch 0"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms -1.0"),
        (["--compute-processes", "0"], "--compute-processes 0"),
        (["--compute", "thread", "--compute-processes", "2"], "--compute-processes needs --compute process"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "launch", "serve", str(tmp_path), *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_similar_health_metrics_and_schema(stack: Any) -> None:
    client = stack["client"]
    _, items = _users_items(stack["world"])
    r = client.get(f"/similar/{items[5]}", params={"k": 4})
    assert r.status_code == 200
    sims = r.json()["items"]
    assert len(sims) == 4 and items[5] not in [s["item_id"] for s in sims]
    assert [s["similarity"] for s in sims] == sorted((s["similarity"] for s in sims), reverse=True)
    missing = client.get("/similar/not-an-item")
    assert missing.status_code == 404 and missing.json()["field"] == "item_id"
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["bundle"]["retrieval"] == ["sasrec", "two_tower"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/similar/{item_id}", "/admin/reload", "/metrics"} <= set(paths)
    assert client.post("/recommend", json={"k": 3}).status_code == 200  # counted below, whatever ran before
    text = client.get("/metrics").text
    assert 'funnel_requests_total{endpoint="/recommend",method="POST",status="200"}' in text
    assert 'funnel_stage_duration_seconds_bucket{stage="ranking",le="+Inf"}' in text
    assert 'funnel_request_duration_seconds_count{endpoint="/similar/{item_id}"}' in text
    # the compute process froze its heap after loading the bundle (whose programs only it holds),
    # and both processes report how long their collections stall them
    frozen = {
        line.split('"')[1]: int(line.split()[1])
        for line in text.splitlines()
        if line.startswith("funnel_gc_frozen_objects{")
    }
    assert frozen["compute"] > max(frozen["http"], 100_000), frozen
    for process in ("http", "compute"):
        assert f'funnel_gc_pause_seconds_count{{generation="0",process="{process}"}}' in text


def test_gc_pauses_are_timed_by_generation() -> None:
    from serving.metrics import GC_PAUSES, Metrics

    before = GC_PAUSES.pauses[2].n
    gc.collect()
    assert GC_PAUSES.pauses[2].n == before + 1 and GC_PAUSES.pauses[2].total > 0
    assert (
        f'funnel_gc_pause_seconds_count{{generation="2",process="http"}} {before + 1}' in Metrics().render()
    )


@pytest.mark.slow
def test_invalid_input_gets_a_4xx_naming_the_field(stack: Any) -> None:
    client = stack["client"]
    cases = [
        ({"k": 0}, 422, "k"),
        ({"diversity": 1.5}, 422, "diversity"),
        ({"user_features": {"shoe_size": 42}}, 422, "user_features.shoe_size"),
        ({"user_features": {"age_bucket": 1.5}}, 422, "user_features.age_bucket"),
        ({"context": {"hour": "noon"}}, 422, "context.hour"),
        ({"context": {"weather": 1.0}}, 422, "context.weather"),
        ({"recent_items": "i001"}, 422, "recent_items"),
        ({"surprise": 1}, 422, "surprise"),
    ]
    for body, status, field in cases:
        r = client.post("/recommend", json=body)
        assert r.status_code == status and r.json()["field"] == field, (body, r.text)
    nan = client.post(
        "/recommend", content=b'{"diversity": NaN}', headers={"content-type": "application/json"}
    )
    assert nan.status_code == 422 and nan.json()["field"] == "diversity"
    broken = client.post("/recommend", content=b'{"k": ', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["field"] == "body"
    big = client.post("/recommend", json={"exclude": ["x" * 200] * 400})
    assert big.status_code == 413 and big.json()["field"] == "body"

    def streamed() -> Any:  # chunked: no content-length to refuse it by
        yield b'{"exclude": ['
        for _ in range(8000):
            yield b'"xxxxxxxxxx",'
        yield b'"x"]}'

    chunked = client.post("/recommend", content=streamed(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["field"] == "body"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _bodies(draw: st.DrawFn, users: list[str], items: list[str]) -> bytes:
    ident = st.sampled_from(users) | st.sampled_from(items) | _JSON
    fields = {
        "user_id": st.sampled_from(users) | _JSON,
        "user_features": st.dictionaries(
            st.sampled_from(["age_bucket", "gender", "region", "user_activity", "x"]) | st.text(max_size=6),
            _JSON | st.sampled_from(["F", "M", "25-34"]),
            max_size=4,
        )
        | _JSON,
        "recent_items": st.lists(ident, max_size=6) | _JSON,
        "k": st.integers(-3, 260) | _JSON,
        "exclude": st.lists(ident, max_size=6) | _JSON,
        "diversity": st.floats(-1, 2) | _JSON,
        "context": st.dictionaries(
            st.sampled_from(["position", "hour", "is_weekend", "session_depth", "price"])
            | st.text(max_size=6),
            _JSON,
            max_size=4,
        )
        | _JSON,
        "exclude_recent": _JSON,
        "candidates": st.none() | st.lists(ident, max_size=6) | _JSON,
    }
    body = draw(st.fixed_dictionaries({}, optional=fields))
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(st.text(max_size=8), _JSON, max_size=2)))
    kind = draw(st.sampled_from(["json", "json", "json", "raw", "other"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "other":
        return json.dumps(draw(_JSON)).encode()
    return json.dumps(body).encode()  # NaN / Infinity included: Python writes them


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(stack: Any) -> None:
    client = stack["client"]
    users, items = _users_items(stack["world"])
    statuses: list[int] = []

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=_bodies(users[:20], items[:50]), path=st.text(max_size=30), k=_JSON)
    def check(body: bytes, path: str, k: Any) -> None:
        r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        statuses.append(r.status_code)
        s = client.get(f"/similar/{quote(path, safe='')}", params={"k": json.dumps(k)})
        assert s.status_code < 500, (path, k, s.text)

    check()
    assert 200 in statuses and 422 in statuses, "the fuzzer must reach both valid and invalid requests"
    assert 'status="5' not in client.get("/metrics").text


@pytest.mark.slow
def test_tampered_bundles_are_refused_at_start_and_at_reload(stack: Any, tmp_path: Path) -> None:
    client = stack["client"]
    serving = client.get("/readyz").json()["bundle"]["version"]
    tampered = tmp_path / "tampered"
    shutil.copytree(stack["root"] / "bundle-a", tampered)
    with open(tampered / "ranking/deepfm/weights.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    r = client.post("/admin/reload", json={"path": str(tampered)})
    assert r.status_code == 422 and "checksum mismatch" in r.json()["error"] and r.json()["field"] == "path"
    missing = client.post("/admin/reload", json={"path": str(tmp_path / "nope")})
    assert missing.status_code == 422 and "not a directory" in missing.json()["error"]
    assert client.get("/readyz").json()["bundle"]["version"] == serving
    assert client.post("/recommend", json={"k": 3}).status_code == 200
    assert 'funnel_reloads_total{result="refused"}' in client.get("/metrics").text

    proc = _serve(tampered, _free_port())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "checksum mismatch" in out


@pytest.mark.slow
def test_reload_under_traffic_loses_no_request(stack: Any) -> None:
    client = stack["client"]
    users, _ = _users_items(stack["world"])
    before = client.get("/readyz").json()["bundle"]["version"]
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=stack["url"], timeout=60) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/recommend", json={"user_id": users[i % len(users)], "k": 5})
                results.append(
                    (r.status_code, r.json().get("bundle", "") if r.status_code == 200 else r.text)
                )
                i += 1

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        reloaded = client.post("/admin/reload", json={"path": str(stack["root"] / "bundle-b")})
        assert reloaded.status_code == 200, reloaded.text
        after = reloaded.json()["bundle"]["version"]
        time.sleep(0.5)
        back = client.post("/admin/reload", json={"path": str(stack["root"] / "bundle-a")})
        assert back.status_code == 200
        # the compute process collected each replaced bundle before freezing its heap again
        assert reloaded.json()["previous_released"] and back.json()["previous_released"]
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert after != before
    assert len(results) > 20
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    seen = [bundle for _, bundle in results]
    assert before in seen and after in seen, "traffic did not span both bundles"
    assert client.get("/readyz").json()["bundle"]["version"] == before


@pytest.mark.slow
def test_the_heap_is_frozen_and_a_reload_frees_the_old_bundle(stack: Any) -> None:
    from fastapi.testclient import TestClient

    funnel = Funnel.load(stack["root"] / "bundle-a")
    # the exported programs sit in reference cycles (fx graphs): only the cyclic collector frees them
    retired = weakref.ref(funnel.ranking.module)
    app = create_app(funnel)
    del funnel
    try:
        with TestClient(app) as client:
            assert gc.get_freeze_count() > 0  # frozen once the app started
            assert client.post("/recommend", json={"k": 3}).status_code == 200
            reloaded = client.post("/admin/reload", json={"path": str(stack["root"] / "bundle-b")})
            assert reloaded.status_code == 200, reloaded.text
            assert retired() is None  # collected before the heap was frozen again, not frozen forever
            assert reloaded.json()["previous_released"] is True
            assert gc.get_freeze_count() > 0
            assert (
                client.post("/recommend", json={"k": 3}).json()["bundle"]
                == reloaded.json()["bundle"]["version"]
            )
    finally:
        gc.unfreeze()


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_the_compute_process_answers_as_in_process_and_its_death_is_a_503(stack: Any) -> None:
    bundle = stack["root"] / "bundle-b"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(bundle, port)  # `funnel serve` computes in a child process by default
    try:
        _wait_ready(proc, url)
        (child,) = _children(proc.pid)
        users, items = _users_items(stack["world"])
        funnel = Funnel.load(bundle)
        with httpx.Client(base_url=url, timeout=60) as client:
            for request in _mixed_requests(users, items)[:8]:
                served = client.post("/recommend", json=dataclasses.asdict(request))
                try:
                    expected = funnel.recommend(request)
                except RequestError as e:  # raised in the child, named in the HTTP answer
                    assert served.status_code == 422 and served.json()["field"] == e.field, served.text
                    continue
                assert served.status_code == 200, served.text
                _assert_same_answer(expected, served.json())
            similar = client.get(f"/similar/{quote(str(items[3]), safe='')}", params={"k": 4})
            assert similar.json() == json.loads(json.dumps(funnel.similar(items[3], 4)))
            assert client.get("/similar/no-such-item").status_code == 404

            os.kill(child, signal.SIGKILL)
            deadline = time.time() + 30
            while client.get("/healthz").status_code == 200 and time.time() < deadline:
                time.sleep(0.1)
            # a dead compute process is an unhealthy server (restart it), never a hung request
            assert client.get("/healthz").status_code == 503
            assert client.get("/readyz").status_code == 503
            assert client.post("/recommend", json={"k": 3}).status_code == 503
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_several_compute_processes_share_the_requests_and_reload_together(stack: Any, tmp_path: Path) -> None:
    bundle_a, bundle_b = stack["root"] / "bundle-a", stack["root"] / "bundle-b"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(bundle_b, port, "--compute-processes", "2")
    try:
        _wait_ready(proc, url)
        children = _children(proc.pid)
        assert len(children) == 2
        users, items = _users_items(stack["world"])
        funnel = Funnel.load(bundle_b)
        requests, expected = [], []
        for request in _mixed_requests(users, items):
            try:
                expected.append(funnel.recommend(request))
            except RequestError:
                continue
            requests.append(request)
        cpu_before = [_cpu_seconds(c) for c in children]

        def answers(client: httpx.Client, rounds: int) -> list[dict[str, Any]]:
            out = []
            for _ in range(rounds):
                for request, want in zip(requests, expected, strict=True):
                    served = client.post("/recommend", json=dataclasses.asdict(request))
                    assert served.status_code == 200, served.text
                    _assert_same_answer(want, served.json())
                    out.append(served.json())
            return out

        clients = [httpx.Client(base_url=url, timeout=60) for _ in range(4)]
        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda c: answers(c, 5), clients))
            # both processes computed a share (loading used none of this CPU: it is measured after)
            used = [_cpu_seconds(c) - before for c, before in zip(children, cpu_before, strict=True)]
            assert min(used) > 0.05, used
            metrics = clients[0].get("/metrics").text
            assert 'process="compute0"' in metrics and 'process="compute1"' in metrics

            old = clients[0].get("/readyz").json()["bundle"]["version"]
            tampered = tmp_path / "tampered"
            shutil.copytree(bundle_a, tampered)
            with open(tampered / "ranking/deepfm/weights.safetensors", "r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(b"\xff\xff\xff\xff")
            refused = clients[0].post("/admin/reload", json={"path": str(tampered)})
            assert refused.status_code == 422 and "checksum mismatch" in refused.json()["error"]
            reloaded = clients[0].post("/admin/reload", json={"path": str(bundle_a)})
            assert reloaded.status_code == 200, reloaded.text
            new = reloaded.json()["bundle"]["version"]
            assert new != old
            # every process serves the new bundle once the reload has answered
            with ThreadPoolExecutor(4) as pool:
                served = pool.map(lambda c: c.post("/recommend", json={"k": 3}).json()["bundle"], clients * 5)
                assert set(served) == {new}

            os.kill(children[1], signal.SIGKILL)
            deadline = time.time() + 30
            while clients[0].get("/healthz").status_code == 200 and time.time() < deadline:
                time.sleep(0.1)
            assert clients[0].get("/healthz").status_code == 503
        finally:
            for client in clients:
                client.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_a_reload_one_process_refuses_puts_every_process_back_on_the_previous_bundle(
    stack: Any, tmp_path: Path
) -> None:
    """ComputeProcesses' rollback: the first process accepts the new bundle, the second then finds it
    tampered with (the copy is corrupted between the two loads) and refuses it; the reload is refused
    and both processes answer from the previous bundle."""
    previous, target = stack["root"] / "bundle-b", tmp_path / "bundle-a"
    shutil.copytree(stack["root"] / "bundle-a", target)
    config = FunnelConfig()
    computes = ComputeProcesses.launch(previous, config, BatchConfig(), processes=2)

    async def scenario() -> tuple[str, list[str]]:
        await computes.start()
        try:
            second = computes.members[1]
            reload_second = second.reload

            async def corrupt_then_reload(path: str, cfg: FunnelConfig) -> tuple[dict[str, Any], bool]:
                if Path(path) == target:  # the new bundle, after the first process accepted it
                    assert computes.members[0].info["path"] == str(target)
                    with open(target / "ranking/deepfm/weights.safetensors", "r+b") as f:
                        f.seek(-4, os.SEEK_END)
                        f.write(b"\xff\xff\xff\xff")
                return await reload_second(path, cfg)

            second.reload = corrupt_then_reload  # type: ignore[method-assign]
            with pytest.raises(BundleError, match=r"checksum mismatch.*every process is back on") as refused:
                await computes.reload(str(target), config)
            answers = [
                (await m.recommend(RecommendRequest(k=3), time.perf_counter()))["bundle"]
                for m in computes.members
            ]
            return str(refused.value), [*answers, *(m.info["path"] for m in computes.members)]
        finally:
            await computes.close()

    message, seen = asyncio.run(scenario())
    version = Funnel.load(previous).version
    assert seen == [version, version, str(previous), str(previous)], message
