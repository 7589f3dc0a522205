"""Response bodies of the HTTP API, as pydantic models: the OpenAPI document is generated from
them, and the fuzz test (tests/test_fuzz_api.py) checks every answer against it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, service_unavailable or server_error")
    code: str = Field(description="Stable machine-readable code, e.g. empty_file, audio_too_long")
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 415, 503, 504)
}


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
    decoding: dict[str, Any] | None = Field(
        None, description="How it was decoded: method greedy or beam (with beam_size, lm_weight, word_bonus, hotwords)"
    )
    words: list[WordOut] | None = Field(None, description="verbose_json only")
    segments: list[SegmentOut] | None = Field(None, description="verbose_json only")


class BatchItem(BaseModel):
    filename: str | None
    status: int = Field(description="What this file alone would have been answered: 200 or an error status")
    result: TranscriptionResponse | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
