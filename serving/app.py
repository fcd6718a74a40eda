"""The HTTP API (FastAPI): ``/recommend``, ``/similar/{item_id}``, health, metrics and hot reload.

Robustness rules: bodies over ``max_body_bytes`` get 413 before they are parsed; any invalid input
gets a 4xx whose ``error`` names the field; nothing a client sends may produce a 5xx.

Concurrency: the handlers are ``async`` and do only HTTP work on the event loop (parse, validate,
encode the answer); every model and index call runs on the :class:`~serving.batching.Batcher`'s one
compute thread, which batches concurrent ``/recommend`` requests into one pass through the funnel
(see ``serving/batching.py``). Compute therefore never runs on more threads than configured, however
many requests are in flight.

Hot reload (``POST /admin/reload {"path": ...}``) loads and verifies the new bundle completely
(checksums, format version, every model, one smoke-test request) on a pool thread while the old
bundle keeps serving, then swaps one reference; requests already submitted finish on the bundle
they started with (a batch never mixes bundles). A bundle that fails any check is refused with 422
and the reason; a reload while another is in progress gets 409.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import BatchConfig, Batcher
from serving.bundle import BundleError
from serving.funnel import STAGES, Funnel, FunnelConfig, RecommendRequest, RequestError
from serving.metrics import Metrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_ID_CHARS = 256
MAX_LIST = 500

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RawId = StrictStr | StrictInt
ShortId = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)] | StrictInt
FeatureValue = (
    Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
    | StrictInt
    | StrictFloat
    | Annotated[list[ShortId], Field(max_length=64)]
)


class RecommendBody(BaseModel):
    """``POST /recommend``. Every field is optional; an empty body gets the cold-start answer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    user_id: ShortId | None = Field(None, description="raw user id; unknown or absent -> cold start")
    user_features: Annotated[dict[str, FeatureValue], Field(max_length=64)] = Field(
        default_factory=dict, description="raw user-side features (e.g. age_bucket), override the bundle's"
    )
    recent_items: Annotated[list[ShortId], Field(max_length=MAX_LIST)] = Field(
        default_factory=list, description="raw ids of the user's recent items, oldest first, newest last"
    )
    k: int = Field(10, ge=1, le=200, description="number of items to return")
    exclude: Annotated[list[ShortId], Field(max_length=MAX_LIST)] = Field(
        default_factory=list, description="raw item ids never to return"
    )
    diversity: float = Field(
        0.0, ge=0.0, le=1.0, description="MMR trade-off: 0 = ranking order, 1 = only dissimilarity counts"
    )
    context: Annotated[dict[str, FeatureValue], Field(max_length=64)] = Field(
        default_factory=dict, description="request context features (e.g. position, hour), raw values"
    )
    exclude_recent: bool = Field(True, description="do not recommend the recent items again")
    candidates: Annotated[list[ShortId], Field(max_length=MAX_LIST)] | None = Field(
        None, description="rank and re-rank exactly these raw item ids instead of retrieving candidates"
    )


class ItemResult(BaseModel):
    item_id: str | int
    score: float = Field(description="final (MMR) score")
    stages: dict[str, Any] = Field(
        description="retrieval {source: score}, ranking p(click), rerank, "
        "max_similarity to the items above it"
    )


class RecommendResponse(BaseModel):
    """The answer of ``/recommend`` (documentation: the handler encodes the JSON itself)."""

    items: list[ItemResult]
    user_known: bool
    cold_start: bool
    candidates: int
    sources: dict[str, int] = Field(description="candidates each retrieval source proposed")
    bundle: str = Field(description="version of the bundle that answered")
    batch: int = Field(description="requests computed together with this one (cross-request batching)")
    latency_ms: dict[str, float] = Field(
        description="queue (waiting for the batch), retrieval, ranking, rerank (of the batch), total"
    )


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


def _field(loc: tuple[Any, ...] | list[Any], kind: str | None = None) -> str:
    """``body.k`` -> ``k``; a body that is not JSON at all is ``body``."""
    parts = [str(p) for p in loc]
    if kind == "json_invalid" or not parts:
        return "body"
    if parts[0] in ("body", "query", "path") and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


def _error(status: int, field: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field, **extra}, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, declared (content-length) or streamed.

    The body is read here, counted, and replayed to the application: an oversized chunked body is
    refused before any of it is parsed (the framework would turn a failing read into a vague 400).
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, send: Send, size: str) -> None:
        message = f"body: {size} exceeds the limit of {self.limit} bytes"
        await _send_json(send, 413, {"error": message, "field": "body"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                error = {"error": "content-length: not an integer", "field": "content-length"}
                await _send_json(send, 400, error)
                return
            if size > self.limit:
                await self._too_large(send, f"{size} bytes")
                return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await self._too_large(send, "the streamed body")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """ASGI middleware: count every response by route template and status, time it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request(endpoint, scope.get("method", ""), status, time.perf_counter() - started)


def freeze_heap() -> None:
    """Exempt every object alive now from the cyclic garbage collector's scans (``gc.freeze``).

    Why: a loaded server holds ~400,000 GC-tracked objects (torch, FastAPI, pydantic, the bundle's
    programs); every full collection walked them all with the GIL held, 230-300 ms on this machine,
    triggered every few seconds by request garbage: the stalls behind the 64-client p99. Frozen, a
    full collection takes ~0.01 ms.
    """
    gc.collect()
    gc.freeze()


def release_and_freeze(retired: weakref.ref[Any], attempts: int = 10, pause_s: float = 0.2) -> bool:
    """After a reload: collect the retired bundle, then freeze the heap again.

    Frozen objects are never collected, and a bundle's programs hold reference cycles, so the old
    bundle must be gone before the next freeze; requests still running on it keep it alive for up to
    a batch, hence the pauses. Each attempt is one full collection (~0.3 s with the GIL held). False:
    still alive after every attempt; the heap stays unfrozen (slower collections, nothing leaked).
    """
    gc.unfreeze()
    for _ in range(attempts):
        time.sleep(pause_s)
        gc.collect()
        if retired() is None:
            gc.freeze()
            return True
    return False


class ServerState:
    """The bundle being served (swapped whole on reload) and what the endpoints share."""

    def __init__(self, funnel: Funnel, config: FunnelConfig, batching: BatchConfig) -> None:
        self.funnel = funnel
        self.config = config
        self.batcher = Batcher(batching)
        self.metrics = Metrics()
        self.metrics.set_bundle(funnel.version, str(funnel.root))
        self.reload_lock = threading.Lock()


def create_app(
    funnel: Funnel,
    config: FunnelConfig | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    batching: BatchConfig | None = None,
) -> Any:
    """The ASGI application serving ``funnel`` (wrapped in the body-limit and metrics middleware).

    ``batching`` sets the compute thread: batch size, batching window, torch/FAISS threads.
    """
    state = ServerState(funnel, config or funnel.config, batching or BatchConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        freeze_heap()
        try:
            yield
        finally:
            state.batcher.close()

    app = FastAPI(
        title="funnel serving",
        version="1",
        description="Retrieval -> ranking -> re-ranking over an exported funnel bundle.",
        lifespan=lifespan,
    )
    app.state.funnel_state = state

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": _field(e.get("loc", ()), e.get("type")),
                "message": str(e.get("msg", "")),
                "type": e.get("type"),
            }
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return JSONResponse(
            {"error": f"{first['field']}: {first['message']}", "field": first["field"], "detail": errors},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail), "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestError)
    async def unservable(request: Request, exc: RequestError) -> JSONResponse:
        return _error(422, exc.field, exc.message)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.post(
        "/recommend",
        summary="Recommend k items for a user (known or cold-start)",
        response_class=JSONResponse,
        responses={200: {"model": RecommendResponse}},
    )
    async def recommend(body: RecommendBody) -> Response:
        request = RecommendRequest(**body.model_dump())
        # a RequestError comes back through the future and becomes a 422 naming the field
        result = await asyncio.wrap_future(state.batcher.submit(state.funnel, request))
        state.metrics.stages(result["latency_ms"], ("queue", *STAGES, "total"))
        state.metrics.batch(result["batch"])
        # encoded here: FastAPI's generic response serialisation costs more than the re-ranking
        return Response(json.dumps(result), media_type="application/json")

    @app.get(
        "/similar/{item_id}", summary="Items most similar to an item (cosine of the bundle's item vectors)"
    )
    async def similar(
        item_id: Annotated[str, Path(max_length=MAX_ID_CHARS)],
        k: Annotated[int, Query(ge=1, le=200)] = 10,
    ) -> Any:
        funnel = state.funnel
        key: str | int = item_id
        if funnel.items.ids.is_int:
            try:
                key = int(item_id)
            except ValueError:
                return _error(404, "item_id", f"unknown item {item_id!r}")
        try:
            return await asyncio.wrap_future(state.batcher.call(lambda: funnel.similar(key, k)))
        except KeyError:
            return _error(404, "item_id", f"unknown item {item_id!r}")

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a verified bundle is loaded")
    async def readyz() -> dict[str, Any]:
        return {"status": "ready", "bundle": state.funnel.info}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/reload", summary="Verify and atomically swap in another bundle")
    def reload(body: ReloadBody) -> Any:  # sync: the verification runs on a pool thread, off the loop
        if not state.reload_lock.acquire(blocking=False):
            return _error(409, "path", "another reload is in progress", serving=state.funnel.version)
        try:
            old = state.funnel
            try:
                new = Funnel.load(body.path, state.config)
            except BundleError as e:
                state.metrics.reload("refused")
                log.warning("reload refused: %s", e)
                return _error(422, "path", f"bundle refused: {e}", serving=old.version)
            state.funnel = new
            state.metrics.set_bundle(new.version, str(new.root))
            state.metrics.reload("ok")
            previous = old.version
            log.info("reloaded bundle %s -> %s (%s)", previous, new.version, new.root)
            retired = weakref.ref(old)
            del old
            if not release_and_freeze(retired):
                log.warning("bundle %s still in use after the reload: heap left unfrozen", previous)
            return {"status": "reloaded", "bundle": new.info, "previous": previous}
        finally:
            state.reload_lock.release()

    return RequestMetrics(BodyLimit(app, max_body_bytes), state.metrics)
