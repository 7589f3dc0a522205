"""The REST service: FastAPI app factory, routes, error handling, model lifecycle.

The model loads in the background after the server starts, so ``/health`` answers 503
("loading") at once and 200 only after a warm-up inference. Each request then goes:
admission (a bounded number per model, else 503 ``queue_full``) -> upload read (size-limited
while it streams in, ``BodyLimit``) -> decode + resample (a small "prep" executor) -> the
model's micro-batching ``Scheduler`` (features, ONNX Runtime and greedy CTC for a padded batch
in the inference executor) -> JSON. The event loop never computes, so ``/health`` and
uploads stay responsive while batches run.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.audio import load_audio
from service.config import Settings
from service.errors import ClientError, ServiceUnavailable
from service.metrics import Metrics
from service.models import ModelPackage, PackageError, Recognizer, list_packages
from service.scheduler import DeadlineExceeded, Scheduler

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")
READ_CHUNK = 1 << 20
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file in a multipart body
OPEN_PATHS = ("/health", "/metrics")  # probes and scrapes: no API key unless ASR_AUTH_ALL_ENDPOINTS
PUBLIC_PATHS = ("/", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect")  # never secret


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, service_unavailable or server_error")
    code: str = Field(description="Stable machine-readable code, e.g. empty_file, audio_too_long")
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class AudioInfo(BaseModel):
    format: str
    subtype: str
    sample_rate: int
    channels: int


class TranscriptionResponse(BaseModel):
    text: str
    model: str
    language: str | None
    duration_s: float = Field(description="Audio duration in seconds")
    processing_ms: float = Field(description="Server time from upload received to result")
    rtf: float = Field(description="Real-time factor: processing time / audio duration")
    audio: AudioInfo


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = (
        "invalid_request_error" if status < 500 else ("service_unavailable" if status in (503, 504) else "server_error")
    )
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ModelState:
    """Lifecycle of the served model: loading -> ready, or failed with a reason."""

    name: str
    status: Literal["loading", "ready", "failed"] = "loading"
    reason: str = "model is loading"
    scheduler: Scheduler | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def require(self) -> Scheduler:
        if self.status == "ready" and self.scheduler is not None:
            return self.scheduler
        if self.status == "loading":
            raise ServiceUnavailable("model_loading", f"model '{self.name}' is loading; retry shortly", 2)
        raise ServiceUnavailable("model_unavailable", f"model '{self.name}' failed to load: {self.reason}")


def pick_default_model(settings: Settings) -> str:
    if settings.default_model:
        return settings.default_model
    names = list_packages(settings.model_dir)
    return names[0] if names else "(none)"


def load_model(settings: Settings, state: ModelState) -> Recognizer | None:
    """Open the package, build the recognizer, run a warm-up inference (in the executor)."""
    t0 = time.perf_counter()
    try:
        pkg = ModelPackage.open(settings.model_dir, settings.tokens_dir, state.name)
        rec = Recognizer(pkg, settings.device, settings.resolved_intra_op_threads(), settings.inter_op_threads)
        t1 = time.perf_counter()
        # Warm-up: the first run allocates buffers and picks kernels; do it before saying ready.
        rec.transcribe([np.zeros(rec.sample_rate, dtype=np.float32)])
    except Exception as e:  # any failure (bad package, ORT refusing the graph) must become a 503 reason
        state.status = "failed"
        state.reason = str(e) if isinstance(e, PackageError) else f"{type(e).__name__}: {e}"
        log.error("model %s failed to load: %s", state.name, state.reason)
        return None
    t2 = time.perf_counter()
    state.details = {
        **pkg.summary(),
        "providers": rec.engine.providers,
        "intra_op_threads": rec.engine.intra_op_threads,
        "inter_op_threads": rec.engine.inter_op_threads,
        "load_s": round(t2 - t0, 3),
        "warmup_ms": round((t2 - t1) * 1000, 1),
    }
    log.info("model %s loaded in %.2f s (providers %s)", state.name, t2 - t0, rec.engine.providers)
    return rec


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """Read the uploaded file, refusing with 413 as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    while chunk := await upload.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise ClientError(413, "file_too_large", f"file exceeds the {limit / 1e6:g} MB upload limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body is read by then, so only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def request_deadline(request: Request, default_s: float) -> float:
    """Monotonic deadline for waiting in the queue: X-Request-Timeout (seconds) or the server default."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return time.monotonic() + default_s if default_s > 0 else math.inf
    try:
        timeout_s = float(raw)
    except ValueError:
        timeout_s = math.nan
    if not (0 < timeout_s < 86400):
        raise ClientError(
            400, "invalid_timeout", f"X-Request-Timeout must be seconds in (0, 86400), got {raw!r}", "X-Request-Timeout"
        )
    return time.monotonic() + timeout_s


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a request body past ``limit`` bytes with 413 while it streams in.

    A declared Content-Length over the limit is refused before any byte is read; a chunked body
    is counted as it arrives and cut off at the limit, so a 2 GB upload is never read (or spooled
    to disk) whole.
    """

    def __init__(self, app: Any, limit: int, on_reject: Callable[[], None]):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        seen, over, sent = 0, False, False

        async def counting_receive() -> Any:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise BodyTooLarge
            return msg

        async def guarded_send(msg: Any) -> None:
            nonlocal sent
            if over:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            sent = True
            await send(msg)

        with suppress(BodyTooLarge):  # usually the app turns it into an answer guarded_send drops
            await self.app(scope, counting_receive, guarded_send)
        if over and not sent:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Any, receive: Any, send: Any) -> None:
        self.on_reject()
        scope.setdefault("state", {})["log_fields"] = {"error_code": "file_too_large"}
        mb = (self.limit - MULTIPART_OVERHEAD) / 1e6
        resp = error_response(413, "file_too_large", f"request body exceeds the {mb:g} MB upload limit", "file")
        await resp(scope, receive, send)


class Admission:
    """ASGI middleware: take the model's admission slot *before* the body is read.

    A full server answers 503 ``queue_full`` (with Retry-After) without reading or parsing the
    upload, so refusals stay fast when the cores are busy. The slot is held until the answer
    is sent.
    """

    def __init__(self, app: Any, state: ModelState, on_refuse: Callable[[], None]):
        self.app, self.state, self.on_refuse = app, state, on_refuse

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sched = self.state.scheduler
        if sched is None or scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/transcribe":
            await self.app(scope, receive, send)  # (no model yet: the route answers 503 loading)
            return
        try:
            sched.admit()
        except ServiceUnavailable as e:
            self.on_refuse()
            scope.setdefault("state", {})["log_fields"] = {"error_code": e.code}
            headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
            await error_response(503, e.code, e.message, headers=headers)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            sched.release()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ModelState(name=pick_default_model(settings))
    api_keys = [k.encode() for k in settings.all_api_keys()]
    # Inference: one thread per worker (each batch uses ONNX Runtime's intra-op threads).
    # Prep: decoding and resampling uploads, kept off the event loop and out of the batch path.
    infer_pool = ThreadPoolExecutor(max_workers=settings.inference_workers, thread_name_prefix="asr-infer")
    prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-prep")

    async def start_model() -> None:
        rec = await asyncio.get_running_loop().run_in_executor(infer_pool, load_model, settings, state)
        if rec is not None:
            sched = Scheduler(
                rec,
                infer_pool,
                max_batch_size=settings.max_batch_size,
                max_queue_delay_ms=settings.max_queue_delay_ms,
                capacity=settings.queue_size,
                workers=settings.inference_workers,
                on_batch=lambda b: metrics.batch(state.name, b),
            )
            sched.start()
            metrics.watch_queue(state.name, lambda: sched.queued, lambda: sched.admitted)
            state.scheduler = sched
            state.status, state.reason = "ready", "ok"
        metrics.ready.labels(state.name).set(1 if state.status == "ready" else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(start_model())
        yield
        # uvicorn has stopped accepting and let in-flight requests finish (ASR_SHUTDOWN_TIMEOUT_S).
        loader.cancel()
        if state.scheduler is not None:
            await state.scheduler.stop()
        infer_pool.shutdown(wait=True, cancel_futures=True)
        prep_pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="NeMo CTC speech-to-text",
        version=__version__,
        description="CPU-first speech recognition for NVIDIA NeMo CTC models exported to ONNX.",
        lifespan=lifespan,
    )
    app.state.draining = False  # set by the SIGTERM handler (service.__main__): readiness goes 503

    def count_failure(request: Request, status: int, code: str) -> None:
        if request.url.path == "/transcribe":
            metrics.failure(state.name, status, code)

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        request.state.log_fields = {"error_code": exc.code}
        count_failure(request, exc.status, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        request.state.log_fields = {"error_code": exc.code}
        count_failure(request, 503, exc.code)
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return error_response(503, exc.code, exc.message, headers=headers)

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        request.state.log_fields = {"error_code": "deadline_exceeded"}
        count_failure(request, 504, "deadline_exceeded")
        return error_response(
            504,
            "deadline_exceeded",
            f"the request waited {exc.waited_s:.2f} s in the queue without reaching compute; "
            "the server is busy: retry later, or allow more time with X-Request-Timeout",
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else str(first.get("msg", "invalid request"))
        count_failure(request, 400, "invalid_request")
        return error_response(400, "invalid_request", msg, loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        count_failure(request, 500, "internal_error")
        return error_response(500, "internal_error", "internal error; the server log has the details")

    # Middleware, innermost first: body limit -> admission -> API key -> request log -> CORS.
    app.add_middleware(
        BodyLimit,
        limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        on_reject=lambda: metrics.failure(state.name, 413, "file_too_large"),
    )
    app.add_middleware(Admission, state=state, on_refuse=lambda: metrics.failure(state.name, 503, "queue_full"))

    @app.middleware("http")
    async def _api_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if (
            not api_keys
            or request.method == "OPTIONS"
            or path in PUBLIC_PATHS
            or (path.startswith(OPEN_PATHS) and not settings.auth_all_endpoints)
        ):
            return await call_next(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            request.state.log_fields = {"error_code": "missing_api_key"}
            return error_response(
                401,
                "missing_api_key",
                "this server requires an API key: send 'Authorization: Bearer <key>'",
                "Authorization",
                {"WWW-Authenticate": "Bearer"},
            )
        # Compare with every key in constant time, so timing does not reveal a key's prefix.
        if not any([hmac.compare_digest(token.strip().encode(), k) for k in api_keys]):
            request.state.log_fields = {"error_code": "invalid_api_key"}
            return error_response(403, "invalid_api_key", "the API key is not valid", "Authorization")
        return await call_next(request)

    @app.middleware("http")
    async def _request_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Request id (X-Request-ID, echoed; generated when absent) and one log line per request."""
        rid = request.headers.get("x-request-id", "")
        if not (0 < len(rid) <= 128 and rid.isprintable()):
            rid = uuid.uuid4().hex
        request.state.request_id = rid
        t0 = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        fields = {
            "request_id": rid,
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
            "client": request.client.host if request.client else None,
            **getattr(request.state, "log_fields", {}),
        }
        # Probes and scrapes arrive every few seconds: keep them out of the info log when healthy.
        quiet = response.status_code == 200 and request.url.path.startswith(("/health", "/metrics"))
        access_log.log(logging.DEBUG if quiet else logging.INFO, "request", extra=fields)
        return response

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )

    @app.get("/", summary="Service information and example calls")
    async def root() -> dict[str, Any]:
        return {
            "service": "nemo-ctc-asr",
            "version": __version__,
            "model": state.name,
            "status": state.status,
            "endpoints": {
                "POST /transcribe": "multipart field 'file': audio (WAV/FLAC/OGG) -> JSON transcript",
                "GET /health": "readiness: 200 when the model is loaded and warmed up, else 503 with a reason",
                "GET /health/live": "liveness: 200 while the process serves requests",
                "GET /stats": "per-model requests, queue, latency percentiles, batch sizes, RTF; RSS, uptime",
                "GET /metrics": "Prometheus text format",
                "GET /docs": "OpenAPI documentation",
            },
            "examples": [
                f"curl -F file=@speech.wav http://localhost:{settings.port}/transcribe",
                f"curl http://localhost:{settings.port}/health",
            ],
        }

    @app.get("/health/live", summary="Liveness: 200 while the process serves requests")
    async def live() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/health/ready",
        summary="Readiness (same as /health)",
        responses={503: {"description": "loading, broken or shutting down, with a reason"}},
    )
    async def ready() -> JSONResponse:
        return await health()

    @app.get(
        "/health",
        summary="Readiness: 200 once the model is loaded and warmed up",
        responses={503: {"description": "loading, broken or shutting down, with a reason"}},
    )
    async def health() -> JSONResponse:
        if app.state.draining:
            body = {"status": "draining", "model": state.name, "reason": "the server is shutting down"}
            return JSONResponse(body, status_code=503)
        if state.status == "ready":
            return JSONResponse({"status": "ok", "model": state.name})
        return JSONResponse(
            {"status": state.status, "model": state.name, "reason": state.reason},
            status_code=503,
            headers={"Retry-After": "2"} if state.status == "loading" else None,
        )

    @app.get("/stats", summary="Per-model requests, queue, latencies, batch sizes, RTF; process RSS, uptime")
    async def stats() -> dict[str, Any]:
        sched = state.scheduler
        queue = (
            {
                "depth": sched.queued,
                "max_depth": sched.max_queued,
                "in_progress": sched.admitted,
                "capacity": sched.capacity,
                "max_batch_size": sched.max_batch_size,
                "max_queue_delay_ms": settings.max_queue_delay_ms,
                "workers": sched.workers,
            }
            if sched
            else None
        )
        model = {"status": state.status, "reason": state.reason, **state.details, "queue": queue}
        return {
            **metrics.process_snapshot(),
            "default_model": state.name,
            "models": {state.name: {**model, **metrics.model_snapshot(state.name)}},
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/transcribe",
        response_model=TranscriptionResponse,
        summary="Transcribe one audio file",
        responses={s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 415, 503, 504)},
    )
    async def transcribe(
        request: Request,
        file: Annotated[
            UploadFile | None, File(description="Audio file: WAV (PCM 8-32 bit or float), FLAC, OGG")
        ] = None,
        model: Annotated[str | None, Form(description="Model name; default: the served model")] = None,
    ) -> TranscriptionResponse | JSONResponse:
        t0 = time.perf_counter()
        if file is None:
            raise ClientError(400, "missing_file", "send the audio as multipart/form-data in a field named 'file'")
        if model and model != state.name:
            raise ClientError(
                404, "model_not_found", f"model '{model}' is not served (available: {state.name})", "model"
            )
        deadline = request_deadline(request, settings.request_timeout_s)
        sched = state.require()
        rec = sched.recognizer
        loop = asyncio.get_running_loop()
        data = await read_upload(file, settings.max_upload_bytes)
        max_s = min(settings.max_duration_s, rec.max_audio_s)
        # Never below what the features need (two frames for normalization).
        min_s = max(settings.min_duration_s, rec.features.min_samples() / rec.sample_rate)
        audio = await loop.run_in_executor(prep_pool, load_audio, data, rec.sample_rate, max_s, min_s)
        del data
        job = asyncio.ensure_future(sched.transcribe(audio.samples, deadline))
        gone = asyncio.ensure_future(wait_disconnect(request))
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not job.done():  # the client went away: its queued work is dropped
            job.cancel()
            request.state.log_fields = {"error_code": "client_disconnected"}
            metrics.failure(state.name, 499, "client_disconnected")
            return error_response(499, "client_disconnected", "the client closed the connection")
        result = job.result()  # DeadlineExceeded -> 504 (handler above)
        elapsed = time.perf_counter() - t0
        metrics.success(state.name, elapsed, audio.duration_s)
        request.state.log_fields = {
            "model": state.name,
            "audio_s": round(audio.duration_s, 3),
            "rtf": round(elapsed / audio.duration_s, 5),
        }
        return TranscriptionResponse(
            text=result.text,
            model=state.name,
            language=rec.package.meta.get("language"),
            duration_s=round(audio.duration_s, 4),
            processing_ms=round(elapsed * 1000, 2),
            rtf=round(elapsed / audio.duration_s, 5),
            audio=AudioInfo(
                format=audio.format, subtype=audio.subtype, sample_rate=audio.source_rate, channels=audio.channels
            ),
        )

    return app
