"""The REST service: FastAPI app factory, routes, error handling, model lifecycle.

The model loads in the background after the server starts, so ``/health`` answers 503
("loading") at once and 200 only after a warm-up inference. CPU work (decode, features,
ONNX Runtime, decoding) runs in a single-thread executor: the event loop stays free for
``/health`` and uploads, and ONNX Runtime's own intra-op threads use the cores without
being oversubscribed by concurrent runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
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

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")
READ_CHUNK = 1 << 20
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file in a multipart body


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
    kind = "invalid_request_error" if status < 500 else ("service_unavailable" if status == 503 else "server_error")
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ModelState:
    """Lifecycle of the served model: loading -> ready, or failed with a reason."""

    name: str
    status: Literal["loading", "ready", "failed"] = "loading"
    reason: str = "model is loading"
    recognizer: Recognizer | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def require(self) -> Recognizer:
        if self.status == "ready" and self.recognizer is not None:
            return self.recognizer
        if self.status == "loading":
            raise ServiceUnavailable("model_loading", f"model '{self.name}' is loading; retry shortly", 2)
        raise ServiceUnavailable("model_unavailable", f"model '{self.name}' failed to load: {self.reason}")


def pick_default_model(settings: Settings) -> str:
    if settings.default_model:
        return settings.default_model
    names = list_packages(settings.model_dir)
    return names[0] if names else "(none)"


def load_model(settings: Settings, state: ModelState) -> None:
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
        return
    t2 = time.perf_counter()
    state.recognizer = rec
    state.details = {
        **pkg.summary(),
        "providers": rec.engine.providers,
        "intra_op_threads": rec.engine.intra_op_threads,
        "inter_op_threads": rec.engine.inter_op_threads,
        "load_s": round(t2 - t0, 3),
        "warmup_ms": round((t2 - t1) * 1000, 1),
    }
    state.status, state.reason = "ready", "ok"
    log.info("model %s ready in %.2f s (providers %s)", state.name, t2 - t0, rec.engine.providers)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """Read the uploaded file, refusing with 413 as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    while chunk := await upload.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise ClientError(413, "file_too_large", f"file exceeds the {limit / 1e6:g} MB upload limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = ModelState(name=pick_default_model(settings))
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-infer")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(executor, load_model, settings, state)
        task.add_done_callback(lambda _: metrics.ready.set(1 if state.status == "ready" else 0))
        yield
        executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="NeMo CTC speech-to-text",
        version=__version__,
        description="CPU-first speech recognition for NVIDIA NeMo CTC models exported to ONNX.",
        lifespan=lifespan,
    )

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        request.state.log_fields = {"error_code": exc.code}
        if request.url.path == "/transcribe":
            metrics.failure(exc.status, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        metrics.failure(503, exc.code)
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return error_response(503, exc.code, exc.message, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else str(first.get("msg", "invalid request"))
        if request.url.path == "/transcribe":
            metrics.failure(400, "invalid_request")
        return error_response(400, "invalid_request", msg, loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        metrics.failure(500, "internal_error")
        return error_response(500, "internal_error", "internal error; the server log has the details")

    @app.middleware("http")
    async def _early_size_check(request: Request, call_next: Any) -> Response:
        """Refuse an oversized body from its Content-Length, before reading any of it."""
        cl = request.headers.get("content-length")
        if (
            request.method == "POST"
            and cl
            and cl.isdigit()
            and int(cl) > settings.max_upload_bytes + MULTIPART_OVERHEAD
        ):
            metrics.failure(413, "file_too_large")
            return error_response(
                413, "file_too_large", f"request body exceeds the {settings.max_upload_mb:g} MB upload limit", "file"
            )
        response: Response = await call_next(request)
        return response

    # Added last, so outermost: every response, early 413s included, gets an id and a log line.
    @app.middleware("http")
    async def _request_log(request: Request, call_next: Any) -> Response:
        """Request id (X-Request-ID, echoed; generated when absent) and one log line per request."""
        rid = request.headers.get("x-request-id", "")
        if not (0 < len(rid) <= 128 and rid.isprintable()):
            rid = uuid.uuid4().hex
        request.state.request_id = rid
        t0 = time.perf_counter()
        response: Response = await call_next(request)
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

    @app.get("/", summary="Service information and example calls")
    async def root() -> dict[str, Any]:
        return {
            "service": "nemo-ctc-asr",
            "version": __version__,
            "model": state.name,
            "status": state.status,
            "endpoints": {
                "POST /transcribe": "multipart field 'file': audio (WAV/FLAC/OGG) -> JSON transcript",
                "GET /health": "200 when the model is loaded and warmed up, else 503 with a reason",
                "GET /stats": "request counts, latency percentiles, real-time factor, model details",
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
        responses={503: {"description": "loading or broken, with a reason"}},
    )
    async def ready() -> JSONResponse:
        return await health()

    @app.get(
        "/health",
        summary="Readiness: 200 once the model is loaded and warmed up",
        responses={503: {"description": "loading or broken, with a reason"}},
    )
    async def health() -> JSONResponse:
        if state.status == "ready":
            return JSONResponse({"status": "ok", "model": state.name})
        return JSONResponse(
            {"status": state.status, "model": state.name, "reason": state.reason},
            status_code=503,
            headers={"Retry-After": "2"} if state.status == "loading" else None,
        )

    @app.get("/stats", summary="Request counts, latency percentiles, RTF, uptime, model details")
    async def stats() -> dict[str, Any]:
        return {**metrics.snapshot(), "model": {"status": state.status, "name": state.name, **state.details}}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/transcribe",
        response_model=TranscriptionResponse,
        summary="Transcribe one audio file",
        responses={s: {"model": ErrorBody} for s in (400, 404, 413, 415, 503)},
    )
    async def transcribe(
        request: Request,
        file: Annotated[
            UploadFile | None, File(description="Audio file: WAV (PCM 8-32 bit or float), FLAC, OGG")
        ] = None,
        model: Annotated[str | None, Form(description="Model name; default: the served model")] = None,
    ) -> TranscriptionResponse:
        t0 = time.perf_counter()
        if file is None:
            raise ClientError(400, "missing_file", "send the audio as multipart/form-data in a field named 'file'")
        if model and model != state.name:
            raise ClientError(
                404, "model_not_found", f"model '{model}' is not served (available: {state.name})", "model"
            )
        rec = state.require()
        data = await read_upload(file, settings.max_upload_bytes)
        max_s = min(settings.max_duration_s, rec.max_audio_s)
        # Never below what the features need (two frames for normalization).
        min_s = max(settings.min_duration_s, rec.features.min_samples() / rec.sample_rate)

        def work() -> tuple[Any, str]:
            audio = load_audio(data, rec.sample_rate, max_s, min_s)
            return audio, rec.transcribe([audio.samples])[0].text

        audio, text = await asyncio.get_running_loop().run_in_executor(executor, work)
        elapsed = time.perf_counter() - t0
        metrics.success(elapsed, audio.duration_s)
        request.state.log_fields = {
            "model": state.name,
            "audio_s": round(audio.duration_s, 3),
            "rtf": round(elapsed / audio.duration_s, 5),
        }
        return TranscriptionResponse(
            text=text,
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
