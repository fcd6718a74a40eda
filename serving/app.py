"""The HTTP API (FastAPI): ``/recommend``, ``/similar/{item_id}``, health, metrics and hot reload.

Robustness rules: bodies over ``max_body_bytes`` get 413 before they are parsed; any invalid input
gets a 4xx whose ``error`` names the field; nothing a client sends may produce a 5xx.

Concurrency: the handlers are ``async`` and do only HTTP work on the event loop (parse, validate,
encode the answer); every model and index call runs on the :class:`~serving.batching.Batcher`'s one
compute thread, which batches concurrent ``/recommend`` requests into one pass through the funnel
(see ``serving/batching.py``), either in this process or, as ``funnel serve`` runs it, in a compute
process of its own (``serving/compute.py``: the event loop and the compute then do not share a
GIL). Compute never runs on more threads than configured, however many requests are in flight.

Hot reload (``POST /admin/reload {"path": ...}``) loads and verifies the new bundle completely
(checksums, format version, every model, one smoke-test request) on a thread of its own while the
old bundle keeps serving, then swaps one reference; requests already submitted finish on the bundle
they started with (a batch never mixes bundles). A bundle that fails any check is refused with 422
and the reason; a reload while another is in progress gets 409.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import BatchConfig
from serving.bundle import BundleError
from serving.compute import ComputeDied, ComputeProcesses, LocalCompute
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


class ServerState:
    """Where the answers are computed (its bundle swapped whole on reload) and what the endpoints share."""

    def __init__(self, compute: LocalCompute | ComputeProcesses, config: FunnelConfig) -> None:
        self.compute = compute
        self.config = config
        self.metrics = Metrics()
        self.metrics.set_bundle(compute.info["version"], compute.info["path"])
        self.reloading = False


def create_app(
    compute: Funnel | LocalCompute | ComputeProcesses,
    config: FunnelConfig | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    batching: BatchConfig | None = None,
) -> Any:
    """The ASGI application (wrapped in the body-limit and metrics middleware) answering from ``compute``.

    A :class:`Funnel` is served by a compute thread of this process (:class:`LocalCompute`), whose
    batch size, batching window and torch/FAISS threads ``batching`` sets; :class:`ComputeProcesses`
    were configured when they were launched. ``config`` is what a reloaded bundle is loaded with.
    """
    if isinstance(compute, Funnel):
        config = config or compute.config
        compute = LocalCompute(compute, batching)
    state = ServerState(compute, config or FunnelConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.compute.start()
        try:
            yield
        finally:
            await state.compute.close()

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

    @app.exception_handler(ComputeDied)
    async def compute_died(request: Request, exc: ComputeDied) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503)

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
        result = await state.compute.recommend(request, time.perf_counter())
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
        try:
            return await state.compute.similar(item_id, k)
        except KeyError:
            return _error(404, "item_id", f"unknown item {item_id!r}")

    @app.get("/healthz", summary="Liveness: 503 once the compute process has died (restart the server)")
    async def healthz() -> Any:
        if not state.compute.alive:
            return JSONResponse({"status": "compute process exited"}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a verified bundle is loaded")
    async def readyz() -> Any:
        if not state.compute.alive:
            return JSONResponse({"status": "compute process exited"}, status_code=503)
        return {"status": "ready", "bundle": state.compute.info}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        try:
            gc_states = await state.compute.gc_states()
        except ComputeDied:  # died since the check: this process's figures only
            gc_states = None
        return PlainTextResponse(state.metrics.render(gc_states), media_type="text/plain; version=0.0.4")

    @app.post("/admin/reload", summary="Verify and atomically swap in another bundle")
    async def reload(body: ReloadBody) -> Any:
        previous = state.compute.info["version"]
        if state.reloading:
            return _error(409, "path", "another reload is in progress", serving=previous)
        state.reloading = True
        try:
            info, released = await state.compute.reload(body.path, state.config)
        except BundleError as e:
            state.metrics.reload("refused")
            log.warning("reload refused: %s", e)
            return _error(422, "path", f"bundle refused: {e}", serving=state.compute.info["version"])
        finally:
            state.reloading = False
        state.metrics.set_bundle(info["version"], info["path"])
        state.metrics.reload("ok")
        log.info("reloaded bundle %s -> %s (%s)", previous, info["version"], info["path"])
        # previous_released false: requests still held the old bundle; its memory is freed later
        return {"status": "reloaded", "bundle": info, "previous": previous, "previous_released": released}

    return RequestMetrics(BodyLimit(app, max_body_bytes), state.metrics)
