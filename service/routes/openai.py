"""The OpenAI-compatible surface: ``POST /v1/audio/transcriptions``, ``GET /v1/models[/{id}]``.

Shaped like OpenAI's API so its clients (the official ``openai`` SDK among them) work unchanged
but for ``base_url``. ``model`` takes any id that ``/v1/models`` lists, ``default``, or one of
OpenAI's own names (``whisper-1``, ``gpt-4o-transcribe``), which mean the default model (or the
``language``'s).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from service.decoders import DecodeRequest
from service.decoding import segment_words
from service.errors import ClientError
from service.formats import segment_dict, word_dict
from service.pipeline import Outcome
from service.registry import ModelEntry, ModelRegistry
from service.routes.common import (
    FILE_DOC,
    MISSING_FILE,
    check_format,
    log_outcome,
    pick_model,
    render,
    transcribe_upload,
)
from service.routes.deps import MetricsDep, PipelineDep, RawPcmDep, RegistryDep, SettingsDep, TimeoutDep
from service.routes.schemas import ERROR_RESPONSES, ErrorBody

router = APIRouter(prefix="/v1", tags=["openai"])
OPENAI_MODEL_PREFIXES = ("whisper", "gpt-")  # names OpenAI clients send; they mean "the default"


def served_model(registry: ModelRegistry, model: str | None) -> str | None:
    """The package an OpenAI client's model name asks for: OpenAI's own names (unless a package
    has one) mean none in particular, i.e. by language, else the default. The Realtime route too."""
    if model and (model in registry.entries or not model.startswith(OPENAI_MODEL_PREFIXES)):
        return model
    return None


def model_card(e: ModelEntry, created: int) -> dict[str, Any]:
    return {
        "id": e.name,
        "object": "model",
        "created": created,
        "owned_by": "nemo-ctc-asr",
        "language": e.language,
        "status": e.status,
    }


@router.get("/models", summary="OpenAI-compatible: the models this server can serve")
async def list_models(registry: RegistryDep, metrics: MetricsDep) -> dict[str, Any]:
    registry.refresh()
    return {"object": "list", "data": [model_card(e, int(metrics.started)) for e in registry.entries.values()]}


@router.get("/models/{model_id}", summary="OpenAI-compatible: one model", responses={404: {"model": ErrorBody}})
async def get_model(model_id: str, registry: RegistryDep, metrics: MetricsDep) -> dict[str, Any]:
    return model_card(registry.resolve(model_id, None), int(metrics.started))


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
        whisper_only = {"seek": 0, "tokens": [], "temperature": 0.0, "compression_ratio": 1.0, "no_speech_prob": 0.0}
        body["segments"] = [{**segment_dict(i, s), **whisper_only} for i, s in enumerate(segment_words(t.words))]
    if "word" in granularities:
        body["words"] = [word_dict(w) for w in t.words]
    return body


def check_granularities(values: list[str] | None) -> set[str]:
    grans = set(values or [])
    if grans - {"word", "segment"}:
        raise ClientError(
            400,
            "invalid_request",
            f"timestamp_granularities[] takes word and segment, got {sorted(grans)}",
            "timestamp_granularities[]",
        )
    return grans


@router.post(
    "/audio/transcriptions",
    summary="OpenAI-compatible transcription (model: an id from /v1/models, 'default', or 'whisper-1')",
    responses=ERROR_RESPONSES,
)
async def create_transcription(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    pipeline: PipelineDep,
    timeout_s: TimeoutDep,
    raw: RawPcmDep,
    file: Annotated[UploadFile | None, File(description=FILE_DOC)] = None,
    model: Annotated[
        str | None,
        Form(description="A model id from /v1/models or 'default'; whisper-1 or empty: by language, else the default"),
    ] = None,
    language: Annotated[str | None, Form(description="ISO-639-1 code: picks a model of that language")] = None,
    response_format: Annotated[str, Form(description="json, text, srt, vtt or verbose_json")] = "json",
    timestamp_granularities: Annotated[
        list[str] | None, Form(alias="timestamp_granularities[]", description="word and/or segment (verbose_json)")
    ] = None,
    prompt: Annotated[
        str | None,
        Form(
            description="Its words become hotwords (beam search with phrase boosting); words the model cannot "
            "spell are dropped"
        ),
    ] = None,
    temperature: Annotated[float | None, Form(description="Accepted and ignored: decoding is deterministic")] = None,
) -> Response:
    fmt = check_format(response_format)
    grans = check_granularities(timestamp_granularities)
    if file is None:
        raise ClientError(400, "missing_file", MISSING_FILE)
    entry = pick_model(request, registry, served_model(registry, model), language)
    decode = DecodeRequest.from_prompt(prompt, settings.decode_limits())
    o = await transcribe_upload(request, pipeline, entry, file, raw.for_upload(file), timeout_s, decode)
    log_outcome(request, o)
    return render(o, fmt, lambda out, verbose: openai_body(out, verbose, grans))
