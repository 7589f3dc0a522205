"""Settings: one typed object, read from ASR_* environment variables (and CLI overrides)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.decoders import DecodeLimits

ROOT = Path(__file__).resolve().parent.parent


def _bundled(folder: str) -> Path:
    """``models``/``tokens`` of the checkout this code runs from; installed with pip, the working directory's."""
    here = ROOT / folder
    return here if here.is_dir() else Path.cwd() / folder


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, capped by a cgroup v2 CPU quota.

    ``os.cpu_count()`` reports the host's cores even inside ``docker run --cpus 2``; sizing
    ONNX Runtime's thread pool by it oversubscribes a throttled container.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


class Settings(BaseSettings):
    """Every setting of the service; environment variable = ``ASR_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="ASR_", extra="ignore")

    model_dir: Path = Field(
        default_factory=lambda: _bundled("models"), description="Directory holding models/<name>/ packages"
    )
    tokens_dir: Path = Field(
        default_factory=lambda: _bundled("tokens"), description="Directory holding tokens/<name>.txt maps"
    )
    default_model: str = Field(
        "", description="Package served by default; empty: the only package, or the first by name"
    )
    preload_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated packages loaded at start besides the default ('*': all); others load on first use",
    )
    models_memory_mb: float = Field(
        4096.0,
        ge=0,
        description="Memory for loaded models; past it the least recently used idle ones unload (0 = no limit)",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="Execution provider: cpu, cuda (needs onnxruntime-gpu), auto (cuda if present)"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = usable CPUs")
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads")
    cpu_mem_arena: bool = Field(
        True, description="ONNX Runtime's CPU memory arena (shrunk when idle); false: slower runs, less RSS under load"
    )
    max_upload_mb: float = Field(
        500.0, gt=0, description="Largest accepted upload, in MB (spooled to disk while it arrives)"
    )
    max_duration_s: float = Field(
        4 * 3600.0, gt=0, description="Longest accepted audio, in seconds (long audio runs in windows)"
    )
    long_audio: Literal["segments", "windows"] = Field(
        "segments",
        description="Long audio: cut at pauses into utterances (segments), or fixed overlapping windows (windows)",
    )
    segment_max_s: float = Field(
        20.0, gt=1, description="Longest input recognized in one piece; longer inputs are cut at pauses"
    )
    min_silence_s: float = Field(0.3, gt=0, description="A pause this long ends an utterance (long audio)")
    speech_gate: bool = Field(
        True, description="Inputs with no speech at all (silence, room tone, steady noise) give an empty text"
    )
    chunk_s: float = Field(60.0, gt=0, description="Long audio, windows mode: seconds each window transcribes")
    chunk_context_s: float = Field(
        10.0, ge=0, description="Long audio, windows mode: seconds of context on each side of a window"
    )
    max_batch_files: int = Field(32, ge=1, description="Most files in one /transcribe/batch request")
    min_duration_s: float = Field(0.1, ge=0, description="Shortest accepted audio, in seconds")
    # Measured on 2 CPU cores (bench/load.py, medium Conformer): batches of up to 8 gave 40 audio s/s
    # against 60 one at a time, and doubled RSS. Hence 1 by default; raise it on GPU hosts.
    max_batch_size: int = Field(
        1, ge=1, description="Most requests run together in one padded batch (1 = no batching: best on CPU)"
    )
    max_queue_delay_ms: float = Field(
        10.0, ge=0, description="Longest a request waits for company before its batch starts anyway"
    )
    queue_size: int = Field(
        64, ge=1, description="Requests admitted at once, server-wide (uploading, queued or computing); beyond: 503"
    )
    uploads_max: int = Field(
        0, ge=0, description="Uploads whose body is still arriving, server-wide; beyond: 503 (0 = 2 x ASR_QUEUE_SIZE)"
    )
    upload_idle_timeout_s: float = Field(
        10.0, gt=0, description="An upload that sends no body byte for this long is cut off with 408"
    )
    upload_min_rate_kbps: float = Field(
        1.0, ge=0, description="Slowest average upload rate (kB/s) once ASR_UPLOAD_GRACE_S has passed; slower: 408"
    )
    upload_grace_s: float = Field(10.0, ge=0, description="How long an upload may take before its rate is checked")
    inference_workers: int = Field(
        1, ge=1, description="Batches computed at once; ONNX Runtime's intra-op threads are split among them"
    )
    request_timeout_s: float = Field(
        60.0, ge=0, description="Longest a request may wait for compute (0 = no limit); X-Request-Timeout overrides"
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests and live sessions may finish"
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, how long to keep serving while not ready, before that (behind a load balancer "
        "that health-checks: longer than its check interval; Kubernetes: 0, its preStop pause does this)",
    )
    # Beam search and hotwords (service.decoders): what one request may ask for.
    beam_max_size: int = Field(32, ge=1, le=256, description="Largest beam_size a request may ask for")
    hotwords_max: int = Field(200, ge=0, description="Most hotwords per request (OpenAI prompt: its first N words)")
    hotword_max_chars: int = Field(64, ge=1, description="Longest hotword phrase, in characters")
    # Live transcription (service.live): OpenAI Realtime over WebSocket, Wyoming over TCP, /live page.
    stream_max: int = Field(32, ge=1, description="Live sessions open at once, server-wide; beyond: refused")
    stream_preset: Literal["fast", "balanced", "wide"] = Field("balanced", description="Live latency/accuracy preset")
    stream_final: Literal["offline", "stream"] = Field(
        "offline", description="A live turn's completed text: offline recognition of the turn, or the stream's own"
    )
    stream_endpoint_blank_s: float = Field(
        1.2, gt=0, description="With server VAD, a live turn also ends after this much blank CTC output following text"
    )
    stream_max_session_s: float = Field(3600.0, gt=0, description="Longest live session, seconds of audio")
    stream_idle_timeout_s: float = Field(30.0, gt=0, description="A live session with no message this long is closed")
    stream_max_message_mb: float = Field(
        2.0, gt=0, description="Largest live message (a WebSocket message or a Wyoming event); beyond: closed"
    )
    wyoming_port: int = Field(
        0, ge=0, le=65535, description="TCP port for the Wyoming server (0 = off; 10300 is usual)"
    )
    quota_requests_per_min: float = Field(
        0.0, ge=0, description="Per client (API key, else address): transcription requests per minute; 0 = no limit"
    )
    quota_audio_s_per_min: float = Field(
        0.0, ge=0, description="Per client: seconds of audio transcribed per minute; 0 = no limit"
    )
    quota_concurrent: int = Field(0, ge=0, description="Per client: transcription requests in progress; 0 = no limit")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated keys; when set, requests need Authorization: Bearer KEY"
    )
    api_keys_file: Path | None = Field(None, description="File with one API key per line (joins ASR_API_KEYS)")
    auth_all_endpoints: bool = Field(
        False, description="Also require the key for /health* and /metrics (open by default, for probes)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS ('*' for any); empty: CORS off"
    )
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="uvicorn's HTTP parser: auto = httptools (C) when installed, else h11 (pure Python)"
    )
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="Event loop: auto = uvloop when installed, else asyncio's"
    )
    host: str = Field("0.0.0.0", description="Interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info")
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line; text: plain")

    @field_validator("api_keys", "cors_origins", "preload_models", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    def all_api_keys(self) -> list[str]:
        """ASR_API_KEYS plus the lines of ASR_API_KEYS_FILE (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                if (k := line.strip()) and not k.startswith("#"):
                    keys.append(k)
        return keys

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.beam_max_size, self.hotwords_max, self.hotword_max_chars)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    def resolved_intra_op_threads(self) -> int:
        """Per inference worker: the usable CPUs shared among the workers, unless set explicitly."""
        return self.intra_op_threads or max(1, available_cpus() // self.inference_workers)
