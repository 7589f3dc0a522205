"""The shared objects a route needs, as FastAPI dependencies.

``service.app.create_app`` builds them once and keeps them on ``app.state.service``; routes
declare what they use (``SettingsDep``, ``RegistryDep``, ...) instead of closing over globals,
so each router can be mounted on its own and each object swapped in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form, Request, UploadFile

from service.audio import RawFormat
from service.config import Settings
from service.decoders import DecodeRequest
from service.http import request_timeout_s
from service.live.hub import LiveHub
from service.live.wyoming import WyomingServer
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.registry import ModelRegistry


@dataclass
class ServiceState:
    """What one app serves with: built by ``create_app``, read by the dependencies below."""

    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    pipeline: Pipeline
    live: LiveHub
    wyoming: WyomingServer | None = None  # when ASR_WYOMING_PORT is set; started by the app's lifespan
    draining: bool = False  # set on SIGTERM (service.__main__): readiness goes 503


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


# The dependencies are ``async def`` though none of them awaits: FastAPI runs a plain ``def``
# dependency in its thread pool, and a request here resolved about 24 of them, each a hop to a
# worker thread and back (bench/http_path.py: the 1 s clip's fixed cost over HTTP).
async def get_state(request: Request) -> ServiceState:
    return _state(request)


async def get_settings(request: Request) -> Settings:
    return _state(request).settings


async def get_metrics(request: Request) -> Metrics:
    return _state(request).metrics


async def get_registry(request: Request) -> ModelRegistry:
    return _state(request).registry


async def get_pipeline(request: Request) -> Pipeline:
    return _state(request).pipeline


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]


async def get_timeout_s(request: Request, settings: SettingsDep) -> float:
    """The request's queue deadline: X-Request-Timeout, else ``ASR_REQUEST_TIMEOUT_S``."""
    return request_timeout_s(request, settings.request_timeout_s)


TimeoutDep = Annotated[float, Depends(get_timeout_s)]

RAW_RATE_DOC = "Raw PCM only: sample rate in Hz (makes a headerless file readable)"
RAW_ENC_DOC = "Raw PCM only: s16le (default), s16be, s24le, s32le, f32le, f64le, u8, s8, mulaw, alaw"
RAW_CH_DOC = "Raw PCM only: interleaved channels (default 1)"


@dataclass(frozen=True)
class RawPcm:
    """The raw-PCM form fields of a request, validated once for all its files."""

    declared: RawFormat | None

    def for_upload(self, upload: UploadFile) -> RawFormat | None:
        """The fields if given, else a part's ``Content-Type: audio/L16;rate=...``, else none (a real file)."""
        return self.declared or RawFormat.from_content_type(upload.content_type)


async def raw_pcm(
    sample_rate: Annotated[int | None, Form(description=RAW_RATE_DOC)] = None,
    encoding: Annotated[str | None, Form(description=RAW_ENC_DOC)] = None,
    channels: Annotated[int | None, Form(description=RAW_CH_DOC)] = None,
) -> RawPcm:
    return RawPcm(RawFormat.parse(sample_rate, encoding, channels))


RawPcmDep = Annotated[RawPcm, Depends(raw_pcm)]


async def decode_form(
    settings: SettingsDep,
    decoding: Annotated[
        str | None,
        Form(description="greedy or beam (default: the model's); beam options and hotwords imply beam"),
    ] = None,
    beam_size: Annotated[int | None, Form(description="Beam width (1 to ASR_BEAM_MAX_SIZE)")] = None,
    lm_weight: Annotated[
        float | None, Form(description="Weight of the model's n-gram LM (NeMo's ngram_lm_alpha); 0: no LM")
    ] = None,
    word_bonus: Annotated[float | None, Form(description="Score added per emitted token (NeMo's beam_beta)")] = None,
    hotwords: Annotated[
        str | None,
        Form(description="Phrases to boost, comma- or newline-separated, each optionally 'phrase:boost'"),
    ] = None,
) -> DecodeRequest:
    return DecodeRequest.from_form(settings.decode_limits(), decoding, beam_size, lm_weight, word_bonus, hotwords)


DecodeDep = Annotated[DecodeRequest, Depends(decode_form)]
