"""Operations: service information, liveness and readiness probes, ``/stats`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import __version__
from service.routes.deps import MetricsDep, StateDep

router = APIRouter(tags=["operations"])
NOT_READY: dict[int | str, dict[str, Any]] = {503: {"description": "loading, broken or shutting down, with a reason"}}
ENDPOINTS = {
    "POST /transcribe": "multipart 'file' (WAV/FLAC/OGG/Opus/MP3/raw PCM) -> transcript; "
    "response_format json|text|srt|vtt|verbose_json (word timings, confidence, segments)",
    "POST /transcribe/batch": "several 'files' -> one result per file",
    "POST /v1/audio/transcriptions": "OpenAI-compatible transcription",
    "GET /v1/models": "OpenAI-compatible model list",
    "GET /health": "readiness: 200 when the default model is loaded and warmed up, else 503 with a reason",
    "GET /health/live": "liveness: 200 while the process serves requests",
    "GET /stats": "per-model requests, queue, latency percentiles, batch sizes, RTF; live sessions; RSS, uptime",
    "WS /v1/realtime": "OpenAI Realtime API transcription sessions (live audio, words as they are spoken)",
    "GET /live": "a page to transcribe from the microphone, or a dropped file",
    "GET /metrics": "Prometheus text format",
    "GET /docs": "OpenAPI documentation",
}


@router.get("/", summary="Service information and example calls")
async def root(state: StateDep) -> dict[str, Any]:
    port, registry = state.settings.port, state.registry
    return {
        "service": "nemo-ctc-asr",
        "version": __version__,
        "default_model": registry.default,
        "models": {n: e.status for n, e in registry.entries.items()},
        "endpoints": ENDPOINTS,
        "examples": [
            f"curl -F file=@speech.wav http://localhost:{port}/transcribe",
            f"curl -F file=@talk.mp3 -F response_format=srt http://localhost:{port}/transcribe",
            f"curl http://localhost:{port}/health",
        ],
    }


@router.get("/health/live", summary="Liveness: 200 while the process serves requests")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health",
    summary="Readiness: 200 once the default and preloaded models are loaded and warmed up; every model's state",
    responses=NOT_READY,
)
async def health(state: StateDep) -> JSONResponse:
    registry = state.registry
    default = registry.entries[registry.default]
    models = {
        n: {"status": e.status, **({"reason": e.reason} if e.status != "ready" else {})}
        for n, e in registry.entries.items()
    }
    if state.draining:
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


@router.get("/health/ready", summary="Readiness (same as /health)", responses=NOT_READY)
async def ready(state: StateDep) -> JSONResponse:
    return await health(state)


def model_stats(state: StateDep) -> dict[str, Any]:
    """Per model: state, measured memory, its queue now, and its request figures."""
    settings, registry, gate = state.settings, state.registry, state.registry.gate
    models = {}
    for name, e in registry.entries.items():
        sched = e.scheduler
        queue = None
        if sched:
            queue = {
                "depth": sched.queued,
                "max_depth": sched.max_queued,
                "in_progress": e.active,
                "capacity": gate.capacity,
                "max_batch_size": sched.max_batch_size,
                "max_queue_delay_ms": settings.max_queue_delay_ms,
                "workers": sched.workers,
            }
        model = {"status": e.status, "reason": e.reason, "language": e.language, **e.details, "queue": queue}
        models[name] = {**model, **state.metrics.model_snapshot(name)}
    return models


@router.get("/stats", summary="Per-model requests, queue, latencies, batch sizes, RTF; process RSS, uptime")
async def stats(state: StateDep) -> dict[str, Any]:
    registry, gate = state.registry, state.registry.gate
    return {
        **state.metrics.process_snapshot(),
        "default_model": registry.default,
        "admission": {
            "in_progress": gate.admitted,
            "max_in_progress": gate.max_admitted,
            "capacity": gate.capacity,
            "uploading": registry.uploads.admitted,
            "max_uploading": registry.uploads.max_admitted,
            "upload_capacity": registry.uploads.capacity,
        },
        "models_memory_mb": {
            "used": round(sum(e.footprint_mb for e in registry.entries.values() if e.status == "ready"), 1),
            "budget": state.settings.models_memory_mb or None,
        },
        "models": model_stats(state),
        "live": state.metrics.live_snapshot(state.live.gate.active, state.live.gate.capacity),
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
