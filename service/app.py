"""The FastAPI app: settings, shared state, middleware, one error handler, the routers. Wiring only.

Models load in the background after the server starts (``service.registry``, on a thread of
their own), so ``/health`` answers 503 ("loading") at once and 200 only after the default
model's warm-up inference. A transcription goes: admission and body limit (``service.middleware``,
before the body is read) -> a router (``service.routes``: native, OpenAI-compatible) -> the one
``service.pipeline.Pipeline`` -> JSON, text, SRT or WebVTT. The event loop never computes, so
``/health`` and uploads stay responsive while batches run. Every error, wherever it is raised,
becomes its JSON body in ``handle_error`` (and per file in the batch route, with the same
``service.errors.error_body``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.config import Settings
from service.errors import ClientError, InternalError, ServiceError
from service.http import error_response
from service.live import page, realtime
from service.live.hub import LiveHub
from service.live.wyoming import WyomingServer
from service.metrics import Metrics
from service.middleware import MULTIPART_OVERHEAD, TRANSCRIBE_PATHS, Admission, ApiKeys, BodyLimit, RequestLog
from service.pipeline import Pipeline
from service.quotas import QuotaLimit, Quotas
from service.registry import ModelRegistry
from service.routes import native, openai, ops
from service.routes.deps import ServiceState

log = logging.getLogger("service")


def as_service_error(exc: Exception) -> ServiceError:
    """Any exception a request ends in, as the ``ServiceError`` its client is told."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
        msg = str(first.get("msg", "invalid request"))
        return ClientError(400, "invalid_request", f"{loc}: {msg}" if loc else msg, loc or None)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return ServiceError(code, str(exc.detail), status=exc.status_code, headers=dict(exc.headers or {}) or None)
    return InternalError()


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one error handler: log fields, failure counts per model, and the JSON body."""
    err = as_service_error(exc)
    if isinstance(err, InternalError):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
    request.state.log_fields = {"error_code": err.code}
    state: ServiceState = request.app.state.service
    if request.method == "POST" and request.url.path in TRANSCRIBE_PATHS:
        state.metrics.failure(getattr(request.state, "model", state.registry.default), err.status, err.code)
    return error_response(err)


def add_middleware(app: FastAPI, state: ServiceState) -> None:
    """Innermost first: body limit -> admission -> quotas -> API keys -> request log -> CORS (outermost).

    Quotas sit inside the key check (an invalid key gets 401, not 429) and outside admission (a
    client over its quota never takes an upload or queue slot)."""
    settings, registry, metrics = state.settings, state.registry, state.metrics
    app.add_middleware(
        BodyLimit,
        limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        on_reject=lambda: metrics.failure(registry.default, 413, "file_too_large"),
    )
    app.add_middleware(
        Admission,
        gate=registry.gate,
        uploads=registry.uploads,
        on_refuse=lambda code, status: metrics.failure(registry.default, status, code),
        idle_timeout_s=settings.upload_idle_timeout_s,
        min_rate_bps=settings.upload_min_rate_kbps * 1000,
        grace_s=settings.upload_grace_s,
    )
    keys = settings.all_api_keys()
    app.add_middleware(
        QuotaLimit,
        quotas=state.live.quotas,  # one set of buckets for requests and live sessions
        paths=TRANSCRIBE_PATHS,
        keyed=bool(keys),
        on_refuse=lambda code, status: metrics.failure(registry.default, status, code),
    )
    app.add_middleware(ApiKeys, keys=keys, protect_probes=settings.auth_all_endpoints)
    app.add_middleware(RequestLog)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    # Inference: one thread per worker (each batch uses ONNX Runtime's intra-op threads), shared
    # by all models. Loading has its own thread (the registry's), decoding its own (the pipeline's).
    infer_pool = ThreadPoolExecutor(max_workers=settings.inference_workers, thread_name_prefix="asr-infer")
    registry = ModelRegistry(settings, metrics, infer_pool)
    pipeline = Pipeline(settings, registry, metrics)
    quotas = Quotas(settings.quota_requests_per_min, settings.quota_audio_s_per_min, settings.quota_concurrent)
    live = LiveHub(settings, registry, pipeline, metrics, quotas)
    state = ServiceState(settings, metrics, registry, pipeline, live)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(registry.start())
        wyoming = WyomingServer(state.live, settings.host, settings.wyoming_port) if settings.wyoming_port else None
        if wyoming is not None:
            await wyoming.start()
        state.wyoming = wyoming
        yield
        if wyoming is not None:
            await wyoming.stop()
        # uvicorn has stopped accepting and let in-flight requests and live sessions finish
        # (service.drain: ASR_DRAIN_DELAY_S, ASR_SHUTDOWN_TIMEOUT_S).
        loader.cancel()
        await state.live.stop()
        await registry.stop()
        infer_pool.shutdown(wait=True, cancel_futures=True)
        state.pipeline.close()

    app = FastAPI(
        title="NeMo CTC speech-to-text",
        version=__version__,
        description="CPU-first speech recognition for NVIDIA NeMo CTC models exported to ONNX. "
        "Native API under /transcribe; OpenAI-compatible API under /v1.",
        lifespan=lifespan,
    )
    app.state.service = state
    for exc_type in (ServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    add_middleware(app, state)
    for router in (native.router, openai.router, ops.router, realtime.router, page.router):
        app.include_router(router)
    return app
