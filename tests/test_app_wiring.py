"""The app's wiring: routers reach shared objects through dependencies (so a test can swap one),
one error rendering for the handler and the batch route, and model loads that never wait for
the inference threads. Runs on the committed default model (no NeMo)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.errors import ClientError, DeadlineExceeded, ServiceError, ServiceUnavailable, error_body
from service.metrics import Metrics
from service.registry import ModelRegistry, default_model_name
from service.routes.deps import get_pipeline

DEFAULT = default_model_name(Settings())


class Refusing:
    """Stands in for the pipeline: every transcription ends in ``err`` (the errors are the real ones)."""

    def __init__(self, err: ServiceError):
        self.err = err

    async def transcribe(self, *args: Any, **kw: Any) -> Any:
        raise self.err


ERRORS = [
    ClientError(413, "audio_too_long", "audio is 312.0 s long; the limit is 300 s"),
    ClientError(400, "corrupt_audio", "the FLAC header cannot be decoded"),
    DeadlineExceeded(1.5),
    ServiceUnavailable("model_loading", "model 'x' is loading; retry shortly", 2),
]


@pytest.fixture
def app() -> FastAPI:
    return create_app(Settings())  # one per test: an app's thread pools end with its lifespan


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: e.code)
def test_each_error_has_one_body_in_the_route_and_in_the_batch(app: FastAPI, err: ServiceError) -> None:
    app.dependency_overrides[get_pipeline] = lambda: Refusing(err)
    try:
        with TestClient(app) as client:
            one = client.post("/transcribe", files={"file": ("a.wav", b"RIFF")})
            assert one.status_code == err.status and one.json() == error_body(err)
            assert one.headers.get("retry-after") == (err.headers or {}).get("Retry-After")
            batch = client.post("/transcribe/batch", files=[("files", ("a.wav", b"RIFF")), ("files", ("b", b"x"))])
            if err.status == 503:  # the server cannot serve the batch at all: one answer, as for one file
                assert batch.status_code == 503 and batch.json() == error_body(err)
                return
            assert batch.status_code == 200
            for item in batch.json()["results"]:  # each file's error is the one the route gives
                assert item["status"] == err.status and {"error": item["error"]} == error_body(err)
            stats = client.get("/stats").json()["models"][DEFAULT]["requests"]
            assert sum(stats[k].get(err.code, 0) for k in stats if isinstance(stats[k], dict)) == 3
    finally:
        app.dependency_overrides.clear()


def test_routers_import_on_their_own() -> None:
    """A surface is a router of its own: mounted alone, it serves (here: the operations router)."""
    from service.live.hub import LiveHub
    from service.pipeline import Pipeline
    from service.routes import ops
    from service.routes.deps import ServiceState

    settings = Settings()
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics, ThreadPoolExecutor(1))
    pipeline = Pipeline(settings, registry, metrics)
    lone = FastAPI()
    lone.state.service = ServiceState(
        settings, metrics, registry, pipeline, LiveHub(settings, registry, pipeline, metrics)
    )
    lone.include_router(ops.router)
    with TestClient(lone) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["models"][DEFAULT]["status"] == "unloaded"
        assert client.get("/health/live").json() == {"status": "alive"}
        assert client.post("/transcribe").status_code == 404  # not mounted


def test_a_model_loads_while_the_inference_threads_are_busy(tmp_path: Path) -> None:
    """Loading model B never waits behind model A's inference (loads run on their own thread)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / DEFAULT).symlink_to(Settings().model_dir / DEFAULT)
    (models / "second").symlink_to(Settings().model_dir / DEFAULT)
    settings = Settings(model_dir=models, default_model=DEFAULT, inference_workers=1)
    infer_pool = ThreadPoolExecutor(max_workers=1)
    registry = ModelRegistry(settings, Metrics(), infer_pool)
    release = threading.Event()
    busy = infer_pool.submit(release.wait, 120)  # the only inference thread runs a long batch

    async def load_second() -> float:
        t0 = time.monotonic()
        await asyncio.wait_for(registry.load(registry.entries["second"]), timeout=60)
        waited = time.monotonic() - t0
        await registry.stop()
        return waited

    try:
        asyncio.run(load_second())
        assert registry.entries["second"].status == "ready", registry.entries["second"].reason
        assert not busy.done()  # it loaded (and warmed up) while the inference thread was still taken
    finally:
        release.set()
        infer_pool.shutdown()


def test_the_server_and_the_tools_cut_long_audio_alike(speech_dir: Path, tmp_path: Path) -> None:
    """One long-audio driver: a 100 s recording (cut at its pauses) gives the same
    transcript, words and window count in process (``transcribe_samples``) as over HTTP."""
    import httpx
    import numpy as np
    import soundfile as sf

    from service.audio import read_audio
    from service.models import ModelPackage, Recognizer
    from service.pipeline import audio_plan, transcribe_samples
    from testkit.server import running_server

    clips = [read_audio(p, 16000)[0] for p in sorted(speech_dir.glob("speech_*.wav"))]
    pause = np.zeros(8000, np.float32)
    recording = np.concatenate([np.concatenate([c, pause]) for c in clips * 6])[: 100 * 16000]
    wav = tmp_path / "long.wav"
    sf.write(wav, recording, 16000, subtype="FLOAT")
    settings = Settings()
    # Built as the registry builds it: ONNX Runtime's thread count changes the log-probs in the
    # last bits, which greedy decoding shrugs off but a beam with an LM may not.
    pkg = ModelPackage.open(settings.model_dir, settings.tokens_dir, DEFAULT)
    rec = Recognizer(pkg, settings.device, settings.resolved_intra_op_threads(), settings.inter_op_threads)
    local, pieces = transcribe_samples(rec, read_audio(wav, 16000)[0], audio_plan(settings, rec))
    assert pieces > 2  # cut at the pauses between sentences
    with running_server({}) as url:
        data = {"response_format": "verbose_json"}
        r = httpx.post(f"{url}/transcribe", files={"file": ("long.wav", wav.read_bytes())}, data=data, timeout=300)
    body = r.json()
    assert r.status_code == 200 and body["chunks"] == pieces
    assert body["text"] == local.text and len(local.text.split()) > 150
    assert [(w["word"], w["start"]) for w in body["words"]] == [(w.word, w.start) for w in local.words]


def test_a_package_bounds_its_pieces_by_what_it_was_trained_on(tmp_path: Path) -> None:
    """``suited_max_s`` (train_ds.max_duration at export) caps the pieces below ASR_SEGMENT_MAX_S."""
    import shutil

    from service.models import ModelPackage, Recognizer
    from service.package import Manifest
    from service.pipeline import audio_plan

    settings = Settings()
    shutil.copytree(settings.model_dir / DEFAULT, tmp_path / DEFAULT)
    m = Manifest.read(tmp_path / DEFAULT)
    config = (settings.model_dir / DEFAULT / "training_config.yaml").read_text()
    trained = re.search(r"^train_ds:\n(?:  .*\n)*?  max_duration: ([0-9.]+)$", config, re.MULTILINE)
    assert trained and m.encoder.suited_max_s == float(trained.group(1))  # what the model was trained on
    m.model_copy(update={"encoder": m.encoder.model_copy(update={"suited_max_s": 8.0})}).write(tmp_path / DEFAULT)
    rec = Recognizer(ModelPackage.open(tmp_path, settings.tokens_dir, DEFAULT))
    plan = audio_plan(settings, rec)
    assert plan.segments.max_segment_s == 8.0
    assert audio_plan(Settings(segment_max_s=5), rec).segments.max_segment_s == 5  # the smaller bound wins


def test_samples_and_uploads_take_the_same_path(app: FastAPI, speech_dir: Path) -> None:
    """``Pipeline.transcribe_samples`` (audio already decoded: the seam for live audio) gives the
    upload's transcript and words for the same samples, and counts as a request of its own."""
    import functools
    import io

    import soundfile as sf

    from service.audio import read_audio

    x = read_audio(sorted(speech_dir.glob("speech_*.wav"))[3], 16000)[0]
    buf = io.BytesIO()
    sf.write(buf, x, 16000, subtype="FLOAT", format="WAV")
    with TestClient(app) as client:
        for _ in range(100):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        upload = client.post(
            "/transcribe", files={"file": ("a.wav", buf.getvalue())}, data={"response_format": "verbose_json"}
        ).json()
        state = app.state.service
        call = functools.partial(state.pipeline.transcribe_samples, state.registry.entries[DEFAULT], x, timeout_s=30)
        out = client.portal.call(call)  # type: ignore[union-attr]
        ok = client.get("/stats").json()["models"][DEFAULT]["requests"]["ok"]
    assert out.transcript.text == upload["text"] and out.transcript.text
    assert [(w.word, w.start) for w in out.transcript.words] == [(w["word"], w["start"]) for w in upload["words"]]
    assert out.info.format == "RAW" and out.duration_s == pytest.approx(upload["duration_s"], abs=1e-3)
    assert ok == 2
