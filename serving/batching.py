"""Cross-request micro-batching: every model and index call of the server runs on one compute thread.

Why one thread: on a small CPU budget, concurrent requests that each run their own encoder, FAISS
search and ranking call (each with its own intra-op / OpenMP threads) oversubscribe the cores and
contend for the GIL, so every stage slows down as load grows. Here the HTTP layer stays async (it
parses, validates and encodes on the event loop) and hands each request to :class:`Batcher`; its
compute thread takes the requests that are waiting, runs them as one batch
(:meth:`serving.funnel.Funnel.recommend_many`: one encoder call and one search per retrieval source,
one ranking call over all their candidates) and resolves each request's future. Per-call work (op
dispatch, index scans, the ranking MLP's weight traffic) is paid once per batch instead of once per
request, and the compute never runs on more threads than configured. Measured on the 25K-item
benchmark bundle, one thread: 3.4 ms of CPU per request alone, 1.1 ms per request in batches of 16.

The batching window: a batch takes every request already queued; when the queue holds fewer than
``max_batch`` it waits for more until ``max_wait_ms`` after the oldest request arrived, but only
when the previous batch held more than one request. Under load, requests queue up while a batch
runs, so batches fill without waiting; a lone client (previous batch of one) never waits.

Requests name the :class:`~serving.funnel.Funnel` they started on, so a hot reload never mixes
bundles: a batch holding requests for two bundles runs as one group per bundle.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import faiss
import torch

from serving.funnel import Funnel, RecommendRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

# FAISS scores an exact search's queries with one BLAS matrix product only when queries x dim
# reaches this threshold; below it, one SIMD scan per query. This build's default (128000: 2000
# queries of 64 dims) is far above any batch. Measured on the 25K-item flat index (k=150, 1 thread),
# per query: scanning 0.26 ms at any batch size; BLAS 0.20 ms at 4 queries of 64 dims, 0.13 at 8,
# 0.09 at 16, but 0.66 at 1 query. The setting is process-wide.
FAISS_BLAS_THRESHOLD = 4 * 64


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 32  # requests per batch
    max_wait_ms: float = 2.0  # how long the oldest request may wait for others (only under concurrency)
    threads: int = 1  # intra-op threads of torch and OpenMP threads of FAISS on the compute thread

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch: {self.max_batch} (must be >= 1)")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms: {self.max_wait_ms} (must be in [0, 1000])")
        if self.threads < 1:
            raise ValueError(f"threads: {self.threads} (must be >= 1)")


@dataclass
class _Job:
    funnel: Funnel
    request: RecommendRequest
    future: Future[dict[str, Any]]
    arrived: float


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


_STOP = object()


class Batcher:
    """The compute thread and its queue; :meth:`submit` and :meth:`call` are safe from any thread."""

    def __init__(self, config: BatchConfig | None = None) -> None:
        self.config = config or BatchConfig()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="funnel-compute", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the compute thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    def submit(
        self, funnel: Funnel, request: RecommendRequest, arrived: float | None = None
    ) -> Future[dict[str, Any]]:
        """A future of ``funnel``'s answer to ``request`` (its exception: the request's RequestError).

        ``arrived``: when the request reached the server (``time.perf_counter()``, default now), from
        which its queue latency counts.
        """
        future: Future[dict[str, Any]] = Future()
        self._queue.put(_Job(funnel, request, future, time.perf_counter() if arrived is None else arrived))
        return future

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` alone on the compute thread (e.g. ``/similar``), in turn with the batches."""
        future: Future[T] = Future()
        self._queue.put(_Call(fn, future))
        return future

    # -- the compute thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        # OpenMP's thread count is a per-thread setting: set it on the thread that runs the calls
        torch.set_num_threads(self.config.threads)
        faiss.omp_set_num_threads(self.config.threads)
        faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
        wait = self.config.max_wait_ms / 1000.0
        held: Any = None  # a call or stop met while collecting a batch, handled after it
        last_batch = 1
        while True:
            item = held if held is not None else self._queue.get()
            if item is _STOP:
                return
            held, last_batch = self._handle(item, last_batch, wait)
            # kept, the last request would hold its bundle alive while the queue is empty, and a
            # bundle retired by a reload must be collectable at once (serving.compute.swap_bundle)
            item = None

    def _handle(self, item: Any, last_batch: int, wait: float) -> tuple[Any, int]:
        """Run a call, or a batch starting with the job ``item``: (what to handle next, batch size)."""
        if isinstance(item, _Call):
            _run(item.future, item.fn)
            return None, last_batch
        batch: list[_Job] = [item]
        held: Any = None
        deadline = item.arrived + (wait if last_batch > 1 else 0.0)
        while len(batch) < self.config.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(block=remaining > 0, timeout=remaining if remaining > 0 else None)
            except queue.Empty:
                break
            if isinstance(nxt, _Job):
                batch.append(nxt)
            else:
                held = nxt
                break
        self._run_batch(batch)
        return held, len(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        # a request whose client went away (its future cancelled) is not computed
        jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
        groups: dict[int, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(id(job.funnel), []).append(job)
        for group in groups.values():
            try:
                answers = group[0].funnel.recommend_many(
                    [j.request for j in group], arrived=[j.arrived for j in group]
                )
            except Exception as e:  # noqa: BLE001 - the requests get the error; the thread keeps serving
                log.exception("batch of %d requests failed", len(group))
                for job in group:
                    job.future.set_exception(e)
                continue
            for job, answer in zip(group, answers, strict=True):
                if isinstance(answer, Exception):
                    job.future.set_exception(answer)
                else:
                    job.future.set_result(answer)
        self.batches += 1
        self.requests += len(jobs)


def _run(future: Future[Any], fn: Callable[[], Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - delivered to the caller, who decides
        future.set_exception(e)
