"""The REST service: FastAPI app factory, routes, error handling.

Models load in the background after the server starts (``service.registry``), so ``/health``
answers 503 ("loading") at once and 200 only after the default model's warm-up inference.
Each transcription then goes: admission (server-wide, before the body is read, else 503
``queue_full``) -> upload (size-limited while it streams in, ``BodyLimit``; spooled to disk)
-> detect + decode + resample, block by block (the "prep" executor) -> the model's
micro-batching ``Scheduler`` (one job, or one per window of a long recording, see
``service.longform``) -> greedy CTC with word timings -> JSON, text, SRT or WebVTT.
The event loop never computes, so ``/health`` and uploads stay responsive while batches run.

Three surfaces share that path: the native ``POST /transcribe`` (and ``/transcribe/batch``),
and ``POST /v1/audio/transcriptions`` + ``GET /v1/models``, shaped like OpenAI's API so its
clients work unchanged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.audio import AudioInfo, AudioSource, RawFormat
from service.config import Settings
from service.decoding import FramePath, segment_words
from service.errors import ClientError, ServiceUnavailable
from service.formats import MEDIA_TYPES, RESPONSE_FORMATS, ResponseFormat, segment_dict, srt, vtt, word_dict
from service.longform import ChunkPlan, scan, windows
from service.metrics import Metrics
from service.models import Transcript
from service.registry import AdmissionGate, ModelEntry, ModelRegistry
from service.scheduler import DeadlineExceeded

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")
T = TypeVar("T")
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file in a multipart body
OPEN_PATHS = ("/health", "/metrics")  # probes and scrapes: no API key unless ASR_AUTH_ALL_ENDPOINTS
PUBLIC_PATHS = ("/", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect")  # never secret
TRANSCRIBE_PATHS = ("/transcribe", "/transcribe/batch", "/v1/audio/transcriptions")


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, service_unavailable or server_error")
    code: str = Field(description="Stable machine-readable code, e.g. empty_file, audio_too_long")
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class AudioDescription(BaseModel):
    format: str = Field(description="Container found in the bytes: WAV, FLAC, OGG, MP3, RAW, ...")
    subtype: str = Field(description="Encoding inside it: PCM_16, FLOAT, VORBIS, OPUS, MPEG_LAYER_III, ...")
    sample_rate: int
    channels: int


class WordOut(BaseModel):
    word: str
    start: float = Field(description="Seconds (NeMo's CTC word offsets x the encoder frame shift)")
    end: float
    confidence: float = Field(description="Lowest CTC posterior of the word's tokens along the best path, 0-1")


class SegmentOut(BaseModel):
    id: int
    start: float
    end: float
    text: str
    confidence: float
    avg_logprob: float


class TranscriptionResponse(BaseModel):
    text: str
    model: str
    language: str | None
    duration_s: float = Field(description="Audio duration in seconds")
    processing_ms: float = Field(description="Server time from upload received to result")
    rtf: float = Field(description="Real-time factor: processing time / audio duration")
    audio: AudioDescription
    chunks: int = Field(1, description="Windows the audio was transcribed in (long audio: more than 1)")
    words: list[WordOut] | None = Field(None, description="verbose_json only")
    segments: list[SegmentOut] | None = Field(None, description="verbose_json only")


class BatchItem(BaseModel):
    filename: str | None
    status: int = Field(description="What this file alone would have been answered: 200 or an error status")
    result: TranscriptionResponse | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = (
        "invalid_request_error" if status < 500 else ("service_unavailable" if status in (503, 504) else "server_error")
    )
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


class ClientGone(Exception):
    """The client closed the connection while its audio waited or ran; its work was dropped."""


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body is read by then, so only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` unless the client leaves first; then cancel it and raise ``ClientGone``."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(request))
    await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not job.done():
        job.cancel()
        raise ClientGone
    return job.result()


def request_timeout_s(request: Request, default_s: float) -> float:
    """Longest a job may wait in the queue: X-Request-Timeout (seconds) or the server default (0 = none)."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return default_s if default_s > 0 else math.inf
    try:
        timeout_s = float(raw)
    except ValueError:
        timeout_s = math.nan
    if not (0 < timeout_s < 86400):
        raise ClientError(
            400, "invalid_timeout", f"X-Request-Timeout must be seconds in (0, 86400), got {raw!r}", "X-Request-Timeout"
        )
    return timeout_s


@dataclass(frozen=True)
class Outcome:
    """One transcribed file, before it is rendered."""

    transcript: Transcript
    entry: ModelEntry
    info: AudioInfo
    duration_s: float
    elapsed_s: float
    chunks: int


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
    """ASGI middleware: take a server-wide admission slot *before* the body is read.

    A full server answers 503 ``queue_full`` (with Retry-After) without reading or parsing the
    upload, so refusals stay fast when the cores are busy. The slot is held until the answer
    is sent.
    """

    def __init__(self, app: Any, gate: AdmissionGate, on_refuse: Callable[[], None]):
        self.app, self.gate, self.on_refuse = app, gate, on_refuse

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in TRANSCRIBE_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            self.gate.admit()
        except ServiceUnavailable as e:
            self.on_refuse()
            scope.setdefault("state", {})["log_fields"] = {"error_code": e.code}
            headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
            await error_response(503, e.code, e.message, headers=headers)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.release()


FILE_DOC = "Audio file: WAV, FLAC, OGG (Vorbis, Opus), MP3, AIFF, AU; or raw PCM with sample_rate"
RAW_RATE_DOC = "Raw PCM only: sample rate in Hz (makes a headerless file readable)"
RAW_ENC_DOC = "Raw PCM only: s16le (default), s16be, s24le, s32le, f32le, f64le, u8, s8, mulaw, alaw"
RAW_CH_DOC = "Raw PCM only: interleaved channels (default 1)"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    # Inference: one thread per worker (each batch uses ONNX Runtime's intra-op threads), shared
    # by all models. Prep: decoding and resampling uploads, kept off the event loop.
    infer_pool = ThreadPoolExecutor(max_workers=settings.inference_workers, thread_name_prefix="asr-infer")
    prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="asr-prep")
    registry = ModelRegistry(settings, metrics, infer_pool)
    api_keys = [k.encode() for k in settings.all_api_keys()]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(registry.start())
        yield
        # uvicorn has stopped accepting and let in-flight requests finish (ASR_SHUTDOWN_TIMEOUT_S).
        loader.cancel()
        await registry.stop()
        infer_pool.shutdown(wait=True, cancel_futures=True)
        prep_pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="NeMo CTC speech-to-text",
        version=__version__,
        description="CPU-first speech recognition for NVIDIA NeMo CTC models exported to ONNX. "
        "Native API under /transcribe; OpenAI-compatible API under /v1.",
        lifespan=lifespan,
    )
    app.state.draining = False  # set by the SIGTERM handler (service.__main__): readiness goes 503
    app.state.registry = registry

    async def prep(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(prep_pool, lambda: fn(*args, **kw))

    def count_failure(request: Request, status: int, code: str) -> None:
        if request.url.path in TRANSCRIBE_PATHS:
            metrics.failure(getattr(request.state, "model", registry.default), status, code)

    def fail(
        request: Request, status: int, code: str, message: str, param: str | None = None, **kw: Any
    ) -> JSONResponse:
        request.state.log_fields = {"error_code": code}
        count_failure(request, status, code)
        return error_response(status, code, message, param, **kw)

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return fail(request, exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return fail(request, 503, exc.code, exc.message, headers=headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> JSONResponse:
        return fail(request, 499, "client_disconnected", "the client closed the connection")

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        return fail(
            request,
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
        return fail(request, 400, "invalid_request", msg, loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return fail(request, 500, "internal_error", "internal error; the server log has the details")

    # Middleware, innermost first: body limit -> admission -> API key -> request log -> CORS.
    app.add_middleware(
        BodyLimit,
        limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        on_reject=lambda: metrics.failure(registry.default, 413, "file_too_large"),
    )
    app.add_middleware(
        Admission, gate=registry.gate, on_refuse=lambda: metrics.failure(registry.default, 503, "queue_full")
    )

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

    # -- the transcription path, shared by every surface ---------------------------------------
    def raw_format(
        upload: UploadFile, sample_rate: int | None, encoding: str | None, channels: int | None
    ) -> RawFormat | None:
        declared = RawFormat.parse(sample_rate, encoding, channels)
        return declared or RawFormat.from_content_type(upload.content_type)

    async def transcribe_file(
        request: Request, entry: ModelEntry, upload: UploadFile, raw: RawFormat | None
    ) -> Outcome:
        t0 = time.perf_counter()
        timeout_s = request_timeout_s(request, settings.request_timeout_s)
        sched = await registry.acquire(entry)
        try:
            rec = sched.recognizer
            rate = rec.sample_rate
            # Never below what the features need (two frames for normalization).
            min_s = max(settings.min_duration_s, rec.features.min_samples() / rate)
            source = await prep(
                AudioSource, upload.file, rate, max_duration_s=settings.max_duration_s, min_duration_s=min_s, raw=raw
            )
            try:
                plan = ChunkPlan.create(
                    settings.chunk_s, settings.chunk_context_s, rate, rec.frame_samples, rec.max_audio_s
                )
                first = await prep(scan, source.blocks(), plan, rec.features)
                if first.samples is not None:
                    path = await until_disconnect(request, sched.infer(first.samples, time.monotonic() + timeout_s))
                    chunks = 1
                else:  # long audio: window by window, each a job of its own in the model's queue
                    parts = []
                    gen = windows(source.blocks(), plan)
                    while (win := await prep(next, gen, None)) is not None:
                        out = await until_disconnect(
                            request, sched.infer(win.samples, time.monotonic() + timeout_s, first.stats)
                        )
                        parts.append(win.keep(out))
                    path, chunks = FramePath.concat(parts), len(parts)
                transcript = await prep(rec.decode, path)
            finally:
                source.close()
        finally:
            registry.release(entry)
        duration_s = source.decoded_s
        elapsed = time.perf_counter() - t0
        metrics.success(entry.name, elapsed, duration_s)
        return Outcome(transcript, entry, source.info, duration_s, elapsed, chunks)

    def native_body(o: Outcome, verbose: bool) -> TranscriptionResponse:
        t = o.transcript
        body = TranscriptionResponse(
            text=t.text,
            model=o.entry.name,
            language=o.entry.language,
            duration_s=round(o.duration_s, 4),
            processing_ms=round(o.elapsed_s * 1000, 2),
            rtf=round(o.elapsed_s / o.duration_s, 5) if o.duration_s else 0.0,
            audio=AudioDescription(
                format=o.info.format, subtype=o.info.subtype, sample_rate=o.info.sample_rate, channels=o.info.channels
            ),
            chunks=o.chunks,
        )
        if verbose:
            body.words = [WordOut(**word_dict(w)) for w in t.words]
            body.segments = [SegmentOut(**segment_dict(i, s)) for i, s in enumerate(segment_words(t.words))]
        return body

    def render(o: Outcome, fmt: ResponseFormat, json_body: Callable[[Outcome, bool], Any]) -> Response:
        if fmt == "text":
            return PlainTextResponse(o.transcript.text + "\n", media_type=MEDIA_TYPES["text"])
        if fmt in ("srt", "vtt"):
            segments = segment_words(o.transcript.words)
            return Response(srt(segments) if fmt == "srt" else vtt(segments), media_type=MEDIA_TYPES[fmt])
        body = json_body(o, fmt == "verbose_json")
        return JSONResponse(body.model_dump(exclude_none=True) if isinstance(body, BaseModel) else body)

    def log_outcome(request: Request, o: Outcome) -> None:
        request.state.log_fields = {
            "model": o.entry.name,
            "audio_s": round(o.duration_s, 3),
            "rtf": round(o.elapsed_s / o.duration_s, 5) if o.duration_s else None,
            "chunks": o.chunks,
        }

    def pick(request: Request, model: str | None, language: str | None) -> ModelEntry:
        entry = registry.resolve(model, language)
        request.state.model = entry.name
        return entry

    def check_format(fmt: str) -> ResponseFormat:
        if fmt not in RESPONSE_FORMATS:
            raise ClientError(
                400,
                "invalid_response_format",
                f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {fmt!r}",
                "response_format",
            )
        return fmt  # type: ignore[return-value]

    @app.get("/", summary="Service information and example calls")
    async def root() -> dict[str, Any]:
        port = settings.port
        return {
            "service": "nemo-ctc-asr",
            "version": __version__,
            "default_model": registry.default,
            "models": {n: e.status for n, e in registry.entries.items()},
            "endpoints": {
                "POST /transcribe": "multipart 'file' (WAV/FLAC/OGG/Opus/MP3/raw PCM) -> transcript; "
                "response_format json|text|srt|vtt|verbose_json (word timings, confidence, segments)",
                "POST /transcribe/batch": "several 'files' -> one result per file",
                "POST /v1/audio/transcriptions": "OpenAI-compatible transcription",
                "GET /v1/models": "OpenAI-compatible model list",
                "GET /health": "readiness: 200 when the default model is loaded and warmed up, else 503 with a reason",
                "GET /health/live": "liveness: 200 while the process serves requests",
                "GET /stats": "per-model requests, queue, latency percentiles, batch sizes, RTF; RSS, uptime",
                "GET /metrics": "Prometheus text format",
                "GET /docs": "OpenAPI documentation",
            },
            "examples": [
                f"curl -F file=@speech.wav http://localhost:{port}/transcribe",
                f"curl -F file=@talk.mp3 -F response_format=srt http://localhost:{port}/transcribe",
                f"curl http://localhost:{port}/health",
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
        summary="Readiness: 200 once the default and preloaded models are loaded and warmed up; every model's state",
        responses={503: {"description": "loading, broken or shutting down, with a reason"}},
    )
    async def health() -> JSONResponse:
        default = registry.entries[registry.default]
        models = {
            n: {"status": e.status, **({"reason": e.reason} if e.status != "ready" else {})}
            for n, e in registry.entries.items()
        }
        if app.state.draining:
            body = {"status": "draining", "model": default.name, "reason": "the server is shutting down"}
            return JSONResponse({**body, "models": models}, status_code=503)
        pending = [n for n in registry.preload if registry.entries[n].status == "loading"]
        if default.status == "ready" and not pending:
            return JSONResponse({"status": "ok", "model": default.name, "models": models})
        if default.status == "ready":  # ASR_PRELOAD_MODELS: ready once all of them have loaded (or failed)
            body = {"status": "loading", "model": default.name, "reason": f"preloading {', '.join(pending)}"}
            return JSONResponse({**body, "models": models}, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse(
            {"status": default.status, "model": default.name, "reason": default.reason, "models": models},
            status_code=503,
            headers={"Retry-After": "2"} if default.status == "loading" else None,
        )

    @app.get("/stats", summary="Per-model requests, queue, latencies, batch sizes, RTF; process RSS, uptime")
    async def stats() -> dict[str, Any]:
        gate = registry.gate
        models = {}
        for name, e in registry.entries.items():
            sched = e.scheduler
            queue = (
                {
                    "depth": sched.queued,
                    "max_depth": sched.max_queued,
                    "in_progress": e.active,
                    "capacity": gate.capacity,
                    "max_batch_size": sched.max_batch_size,
                    "max_queue_delay_ms": settings.max_queue_delay_ms,
                    "workers": sched.workers,
                }
                if sched
                else None
            )
            model = {"status": e.status, "reason": e.reason, "language": e.language, **e.details, "queue": queue}
            models[name] = {**model, **metrics.model_snapshot(name)}
        return {
            **metrics.process_snapshot(),
            "default_model": registry.default,
            "admission": {
                "in_progress": gate.admitted,
                "max_in_progress": gate.max_admitted,
                "capacity": gate.capacity,
            },
            "models_memory_mb": {
                "used": round(sum(e.footprint_mb for e in registry.entries.values() if e.status == "ready"), 1),
                "budget": settings.models_memory_mb or None,
            },
            "models": models,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    error_responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 415, 503, 504)
    }

    @app.post(
        "/transcribe",
        response_model=TranscriptionResponse,
        response_model_exclude_none=True,
        summary="Transcribe one audio file",
        responses={
            **error_responses,
            200: {"content": {"text/plain": {}, "application/x-subrip": {}, "text/vtt": {}}},
        },
    )
    async def transcribe(
        request: Request,
        file: Annotated[UploadFile | None, File(description=FILE_DOC)] = None,
        model: Annotated[str | None, Form(description="Model name; default: the server's default model")] = None,
        language: Annotated[
            str | None, Form(description="Pick the model by language (e.g. en, hi) if no model")
        ] = None,
        response_format: Annotated[str, Form(description="json, text, srt, vtt or verbose_json")] = "json",
        sample_rate: Annotated[int | None, Form(description=RAW_RATE_DOC)] = None,
        encoding: Annotated[str | None, Form(description=RAW_ENC_DOC)] = None,
        channels: Annotated[int | None, Form(description=RAW_CH_DOC)] = None,
    ) -> Response:
        fmt = check_format(response_format)
        if file is None:
            raise ClientError(400, "missing_file", "send the audio as multipart/form-data in a field named 'file'")
        entry = pick(request, model, language)
        o = await transcribe_file(request, entry, file, raw_format(file, sample_rate, encoding, channels))
        log_outcome(request, o)
        return render(o, fmt, native_body)

    @app.post(
        "/transcribe/batch",
        response_model=BatchResponse,
        summary="Transcribe several files; one result per file, in order",
        responses=error_responses,
    )
    async def transcribe_batch(
        request: Request,
        files: Annotated[list[UploadFile] | None, File(description="Audio files (repeat the field)")] = None,
        model: Annotated[str | None, Form(description="Model name; default: the server's default model")] = None,
        language: Annotated[str | None, Form(description="Pick the model by language if no model")] = None,
        response_format: Annotated[Literal["json", "verbose_json"], Form()] = "json",
        sample_rate: Annotated[int | None, Form(description=RAW_RATE_DOC)] = None,
        encoding: Annotated[str | None, Form(description=RAW_ENC_DOC)] = None,
        channels: Annotated[int | None, Form(description=RAW_CH_DOC)] = None,
    ) -> BatchResponse:
        if not files:
            raise ClientError(400, "missing_file", "send the audio files as multipart fields named 'files'", "files")
        if len(files) > settings.max_batch_files:
            raise ClientError(
                400, "too_many_files", f"{len(files)} files; at most {settings.max_batch_files} per batch", "files"
            )
        entry = pick(request, model, language)
        results = []
        ok = 0
        for f in files:  # one after another: the scheduler interleaves them with other clients' work
            try:
                o = await transcribe_file(request, entry, f, raw_format(f, sample_rate, encoding, channels))
            except ClientError as e:
                metrics.failure(entry.name, e.status, e.code)
                results.append(
                    BatchItem(
                        filename=f.filename,
                        status=e.status,
                        error=ErrorDetail(**error_body(e.status, e.code, e.message, e.param)["error"]),
                    )
                )
                continue
            except DeadlineExceeded as e:
                metrics.failure(entry.name, 504, "deadline_exceeded")
                err = error_body(
                    504, "deadline_exceeded", f"waited {e.waited_s:.2f} s in the queue without reaching compute"
                )
                results.append(BatchItem(filename=f.filename, status=504, error=ErrorDetail(**err["error"])))
                continue
            ok += 1
            results.append(
                BatchItem(filename=f.filename, status=200, result=native_body(o, response_format == "verbose_json"))
            )
        request.state.log_fields = {"model": entry.name, "files": len(files), "ok": ok}
        return BatchResponse(results=results)

    # -- OpenAI-compatible surface ------------------------------------------------------------
    def openai_model(e: ModelEntry) -> dict[str, Any]:
        return {
            "id": e.name,
            "object": "model",
            "created": int(metrics.started),
            "owned_by": "nemo-ctc-asr",
            "language": e.language,
            "status": e.status,
        }

    @app.get("/v1/models", summary="OpenAI-compatible: the models this server can serve")
    async def v1_models() -> dict[str, Any]:
        registry.refresh()
        return {"object": "list", "data": [openai_model(e) for e in registry.entries.values()]}

    @app.get("/v1/models/{model_id}", summary="OpenAI-compatible: one model", responses={404: {"model": ErrorBody}})
    async def v1_model(model_id: str) -> dict[str, Any]:
        return openai_model(registry.resolve(model_id, None))

    def openai_body(o: Outcome, verbose: bool, granularities: set[str]) -> dict[str, Any]:
        t = o.transcript
        if not verbose:
            return {"text": t.text}
        body: dict[str, Any] = {
            "task": "transcribe",
            "language": o.entry.language,
            "duration": round(o.duration_s, 3),
            "text": t.text,
        }
        if "segment" in granularities or not granularities:
            body["segments"] = [
                {
                    **segment_dict(i, s),
                    "seek": 0,
                    "tokens": [],
                    "temperature": 0.0,
                    "compression_ratio": 1.0,
                    "no_speech_prob": 0.0,
                }
                for i, s in enumerate(segment_words(t.words))
            ]
        if "word" in granularities:
            body["words"] = [word_dict(w) for w in t.words]
        return body

    @app.post(
        "/v1/audio/transcriptions",
        summary="OpenAI-compatible transcription (model: a served model's id, or 'whisper-1' for the default)",
        responses=error_responses,
    )
    async def v1_transcriptions(
        request: Request,
        file: Annotated[UploadFile | None, File(description=FILE_DOC)] = None,
        model: Annotated[
            str | None,
            Form(description="A model id from /v1/models; whisper-1 or empty: by language, else the default"),
        ] = None,
        language: Annotated[str | None, Form(description="ISO-639-1 code: picks a model of that language")] = None,
        response_format: Annotated[str, Form(description="json, text, srt, vtt or verbose_json")] = "json",
        timestamp_granularities: Annotated[
            list[str] | None, Form(alias="timestamp_granularities[]", description="word and/or segment (verbose_json)")
        ] = None,
        prompt: Annotated[str | None, Form(description="Accepted and ignored: CTC models take no prompt")] = None,
        temperature: Annotated[float | None, Form(description="Accepted and ignored: decoding is greedy")] = None,
        sample_rate: Annotated[int | None, Form(description=RAW_RATE_DOC)] = None,
        encoding: Annotated[str | None, Form(description=RAW_ENC_DOC)] = None,
        channels: Annotated[int | None, Form(description=RAW_CH_DOC)] = None,
    ) -> Response:
        fmt = check_format(response_format)
        grans = set(timestamp_granularities or [])
        if grans - {"word", "segment"}:
            raise ClientError(
                400,
                "invalid_request",
                f"timestamp_granularities[] takes word and segment, got {sorted(grans)}",
                "timestamp_granularities[]",
            )
        if file is None:
            raise ClientError(400, "missing_file", "send the audio as multipart/form-data in a field named 'file'")
        # OpenAI clients send their own model names (whisper-1, gpt-4o-transcribe): those mean "the default".
        served = model if model and (model in registry.entries or not model.startswith(("whisper", "gpt-"))) else None
        entry = pick(request, served, language)
        o = await transcribe_file(request, entry, file, raw_format(file, sample_rate, encoding, channels))
        log_outcome(request, o)
        return render(o, fmt, lambda out, verbose: openai_body(out, verbose, grans))

    return app
