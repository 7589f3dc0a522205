"""The native REST surface: ``POST /transcribe`` (one file) and ``POST /transcribe/batch``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from service.decoding import segment_words
from service.errors import ClientError, DeadlineExceeded, error_body
from service.formats import segment_dict, word_dict
from service.pipeline import Outcome
from service.routes.common import (
    FILE_DOC,
    MISSING_FILE,
    check_format,
    log_outcome,
    pick_model,
    render,
    transcribe_upload,
)
from service.routes.deps import DecodeDep, MetricsDep, PipelineDep, RawPcmDep, RegistryDep, SettingsDep, TimeoutDep
from service.routes.schemas import (
    ERROR_RESPONSES,
    AudioDescription,
    BatchItem,
    BatchResponse,
    ErrorDetail,
    SegmentOut,
    TranscriptionResponse,
    WordOut,
)

router = APIRouter(tags=["native"])
ModelForm = Annotated[str | None, Form(description="Model name ('default' or none: the server's default model)")]
LanguageForm = Annotated[str | None, Form(description="Pick the model by language (e.g. en, hi) if no model")]


def native_body(o: Outcome, verbose: bool) -> TranscriptionResponse:
    t, info = o.transcript, o.info
    body = TranscriptionResponse(
        text=t.text,
        model=o.entry.name,
        language=o.entry.language,
        duration_s=round(o.duration_s, 4),
        processing_ms=round(o.elapsed_s * 1000, 2),
        rtf=round(o.elapsed_s / o.duration_s, 5) if o.duration_s else 0.0,
        audio=AudioDescription(
            format=info.format, subtype=info.subtype, sample_rate=info.sample_rate, channels=info.channels
        ),
        chunks=o.chunks,
        decoding=o.decoding,
    )
    if verbose:
        body.words = [WordOut(**word_dict(w)) for w in t.words]
        body.segments = [SegmentOut(**segment_dict(i, s)) for i, s in enumerate(segment_words(t.words))]
    return body


@router.post(
    "/transcribe",
    response_model=TranscriptionResponse,
    response_model_exclude_none=True,
    summary="Transcribe one audio file",
    responses={**ERROR_RESPONSES, 200: {"content": {"text/plain": {}, "application/x-subrip": {}, "text/vtt": {}}}},
)
async def transcribe(
    request: Request,
    registry: RegistryDep,
    pipeline: PipelineDep,
    timeout_s: TimeoutDep,
    raw: RawPcmDep,
    decode: DecodeDep,
    file: Annotated[UploadFile | None, File(description=FILE_DOC)] = None,
    model: ModelForm = None,
    language: LanguageForm = None,
    response_format: Annotated[str, Form(description="json, text, srt, vtt or verbose_json")] = "json",
) -> Response:
    fmt = check_format(response_format)
    if file is None:
        raise ClientError(400, "missing_file", MISSING_FILE)
    entry = pick_model(request, registry, model, language)
    o = await transcribe_upload(request, pipeline, entry, file, raw.for_upload(file), timeout_s, decode)
    log_outcome(request, o)
    return render(o, fmt, native_body)


@router.post(
    "/transcribe/batch",
    response_model=BatchResponse,
    summary="Transcribe several files; one result per file, in order",
    responses=ERROR_RESPONSES,
)
async def transcribe_batch(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    pipeline: PipelineDep,
    metrics: MetricsDep,
    timeout_s: TimeoutDep,
    raw: RawPcmDep,
    decode: DecodeDep,
    files: Annotated[list[UploadFile] | None, File(description="Audio files (repeat the field)")] = None,
    model: ModelForm = None,
    language: LanguageForm = None,
    response_format: Annotated[Literal["json", "verbose_json"], Form()] = "json",
) -> BatchResponse:
    if not files:
        raise ClientError(400, "missing_file", "send the audio files as multipart fields named 'files'", "files")
    if len(files) > settings.max_batch_files:
        raise ClientError(
            400, "too_many_files", f"{len(files)} files; at most {settings.max_batch_files} per batch", "files"
        )
    entry = pick_model(request, registry, model, language)
    results = []
    audio_s = 0.0
    for f in files:  # one after another: the scheduler interleaves them with other clients' work
        try:
            o = await transcribe_upload(request, pipeline, entry, f, raw.for_upload(f), timeout_s, decode)
        except (ClientError, DeadlineExceeded) as e:  # this file's own problem; others (503, 499) end the batch
            metrics.failure(entry.name, e.status, e.code)
            results.append(BatchItem(filename=f.filename, status=e.status, error=ErrorDetail(**error_body(e)["error"])))
            continue
        audio_s += o.duration_s
        results.append(
            BatchItem(filename=f.filename, status=200, result=native_body(o, response_format == "verbose_json"))
        )
    ok = sum(r.status == 200 for r in results)
    # audio_s: what the batch is charged against ASR_QUOTA_AUDIO_S_PER_MIN (service/quotas.py).
    request.state.log_fields = {"model": entry.name, "files": len(files), "ok": ok, "audio_s": round(audio_s, 3)}
    return BatchResponse(results=results)
