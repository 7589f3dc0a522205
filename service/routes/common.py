"""What the transcription routes share: choosing the model, checking the output format,
running one upload through the pipeline, and rendering text / SRT / WebVTT / JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from service.audio import RawFormat
from service.decoders import DecodeRequest
from service.decoding import segment_words
from service.errors import ClientError
from service.formats import MEDIA_TYPES, RESPONSE_FORMATS, ResponseFormat, srt, vtt
from service.http import until_disconnect
from service.pipeline import Outcome, Pipeline
from service.registry import ModelEntry, ModelRegistry

FILE_DOC = "Audio file: WAV, FLAC, OGG (Vorbis, Opus), MP3, AIFF, AU; or raw PCM with sample_rate"
MISSING_FILE = "send the audio as multipart/form-data in a field named 'file'"


def pick_model(request: Request, registry: ModelRegistry, model: str | None, language: str | None) -> ModelEntry:
    """The model a request asks for; failures from here on are counted against it."""
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


async def transcribe_upload(
    request: Request,
    pipeline: Pipeline,
    entry: ModelEntry,
    upload: UploadFile,
    raw: RawFormat | None,
    timeout_s: float,
    decode: DecodeRequest | None = None,
) -> Outcome:
    """One uploaded file through the pipeline; work is dropped if the client goes away."""
    return await pipeline.transcribe(
        entry,
        upload.file,
        raw,
        timeout_s=timeout_s,
        guard=lambda work: until_disconnect(request, work),
        decode=decode,
    )


def log_outcome(request: Request, o: Outcome) -> None:
    request.state.log_fields = {
        "model": o.entry.name,
        "audio_s": round(o.duration_s, 3),
        "rtf": round(o.elapsed_s / o.duration_s, 5) if o.duration_s else None,
        "chunks": o.chunks,
        "decoding": (o.decoding or {}).get("method"),
    }


def render(o: Outcome, fmt: ResponseFormat, json_body: Callable[[Outcome, bool], Any]) -> Response:
    """The answer in ``fmt``; ``json_body`` builds the surface's own JSON (verbose or not)."""
    if fmt == "text":
        return PlainTextResponse(o.transcript.text + "\n", media_type=MEDIA_TYPES["text"])
    if fmt in ("srt", "vtt"):
        segments = segment_words(o.transcript.words)
        return Response(srt(segments) if fmt == "srt" else vtt(segments), media_type=MEDIA_TYPES[fmt])
    body = json_body(o, fmt == "verbose_json")
    return JSONResponse(body.model_dump(exclude_none=True) if isinstance(body, BaseModel) else body)
