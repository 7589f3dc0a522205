"""The real service over real HTTP: transcripts equal NeMo's, every bad input gets a clear 4xx.

Most of it runs on the committed default model (``server``: the fast tier, no NeMo); the tests
that compare transcripts with NeMo's own run on a NeMo-built model (``nemo_server``)."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from service.config import Settings
from service.registry import default_model_name
from testkit.server import running_server
from tests.conftest import NemoModel, speech_files


def model_env(m: NemoModel, **extra: str) -> dict[str, str]:
    """A server on a NeMo-built model. The speech gate is off: these servers are compared with NeMo on
    every clip, noise included (``test_the_speech_gate_only_silences_non_speech`` runs it on)."""
    return {
        "ASR_MODEL_DIR": str(m.model_dir),
        "ASR_TOKENS_DIR": str(m.tokens_dir),
        "ASR_DEFAULT_MODEL": m.name,
        "ASR_SPEECH_GATE": "false",
        **extra,
    }


DEFAULT_MODEL = default_model_name(Settings())


def default_env(**extra: str) -> dict[str, str]:
    """The server as users start it: the bundled models, plus ``extra`` settings."""
    return dict(extra)


@pytest.fixture(scope="module")
def clips(speech_dir: Path) -> list[Path]:
    return speech_files(speech_dir)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The committed default model (no NeMo needed)."""
    with running_server(default_env(ASR_MAX_DURATION_S="60")) as url:
        yield url


@pytest.fixture(scope="module")
def nemo_server(conformer: NemoModel) -> Iterator[str]:
    """A NeMo-built model whose NeMo transcripts the fixture recorded."""
    with running_server(model_env(conformer, ASR_MAX_DURATION_S="60")) as url:
        yield url


def post(url: str, data: bytes, filename: str = "audio.wav", **form: str) -> httpx.Response:
    return httpx.post(f"{url}/transcribe", files={"file": (filename, data)}, data=form or None, timeout=120)


def wav_bytes(x: np.ndarray, sr: int, subtype: str, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, subtype=subtype, format=fmt)
    return buf.getvalue()


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["message"]


# --- happy paths -------------------------------------------------------------------------


def test_health_root_docs(server: str) -> None:
    h = httpx.get(f"{server}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    root = httpx.get(f"{server}/").json()
    assert "POST /transcribe" in root["endpoints"] and root["examples"]
    assert httpx.get(f"{server}/docs").status_code == 200
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "/transcribe" in spec["paths"]


def test_transcripts_over_http_equal_nemo(nemo_server: str, conformer: NemoModel) -> None:
    for path, expected in zip(conformer.files, conformer.transcripts, strict=True):
        r = post(nemo_server, path.read_bytes(), path.name)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == expected, path.name
        n = sf.info(str(path)).frames
        assert body["duration_s"] == pytest.approx(n / 16000, abs=1e-3)
        assert body["model"] == conformer.name and body["processing_ms"] > 0 and body["rtf"] > 0


def test_the_speech_gate_only_silences_non_speech(conformer: NemoModel) -> None:
    """With the gate on (the default), speech gets NeMo's exact transcript; noise gets no words.

    NeMo itself transcribes whatever it is given: on noise, a random model's gibberish (a trained
    one's invented words). The gate answers "" there without running the model.
    """
    with running_server(model_env(conformer, ASR_SPEECH_GATE="true")) as url:
        for path, expected in zip(conformer.files, conformer.transcripts, strict=True):
            text = post(url, path.read_bytes(), path.name).json()["text"]
            assert text == ("" if path.name.startswith("noise_") else expected), path.name
        batches = httpx.get(f"{url}/stats").json()["models"][conformer.name]["batches"]
    assert batches == len(conformer.files) - 2  # the two noise clips never reached the model


@pytest.mark.parametrize(
    "subtype,channels",
    [("PCM_24", 1), ("PCM_32", 1), ("FLOAT", 1), ("DOUBLE", 1), ("PCM_16", 2), ("PCM_24", 3)],
)
def test_bit_depths_and_channels_same_transcript(
    nemo_server: str, conformer: NemoModel, subtype: str, channels: int
) -> None:
    """The same 16 kHz samples in a wider format, or copied to every channel, give NeMo's text."""
    path, expected = conformer.files[1], conformer.transcripts[1]
    x, sr = sf.read(str(path), dtype="float64")
    data = wav_bytes(np.repeat(x[:, None], channels, axis=1), sr, subtype)
    r = post(nemo_server, data)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == expected
    assert r.json()["audio"]["channels"] == channels


@pytest.mark.parametrize("rate,subtype", [(8000, "PCM_U8"), (22050, "PCM_16"), (44100, "PCM_24"), (48000, "FLOAT")])
def test_other_sample_rates_are_resampled(
    server: str, clips: list[Path], tmp_path: Path, rate: int, subtype: str
) -> None:
    src = clips[0]
    out = tmp_path / f"r{rate}.wav"
    # sox does the conversion: an independent resampler, not the service's soxr call.
    enc = ["-e", "unsigned-integer", "-b", "8"] if subtype == "PCM_U8" else []
    subprocess.run(["sox", str(src), "-r", str(rate), *enc, str(out)], check=True)
    if subtype in ("PCM_24", "FLOAT"):
        x, _ = sf.read(str(out))
        sf.write(out, x, rate, subtype=subtype)
    r = post(server, out.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["audio"]["sample_rate"] == rate
    assert body["duration_s"] == pytest.approx(sf.info(str(src)).duration, abs=0.01)


def test_flac_is_accepted(nemo_server: str, conformer: NemoModel) -> None:
    x, sr = sf.read(str(conformer.files[2]), dtype="int16")
    r = post(nemo_server, wav_bytes(x, sr, "PCM_16", "FLAC"), "a.flac")
    assert r.status_code == 200 and r.json()["text"] == conformer.transcripts[2]


def test_stats_and_metrics_count_requests(server: str, clips: list[Path]) -> None:
    def model_stats() -> dict:
        return httpx.get(f"{server}/stats").json()["models"][DEFAULT_MODEL]

    before = model_stats()
    post(server, clips[0].read_bytes())
    post(server, b"")
    stats = httpx.get(f"{server}/stats").json()
    after = stats["models"][DEFAULT_MODEL]
    assert after["requests"]["ok"] == before["requests"].get("ok", 0) + 1
    assert (
        after["requests"]["client_error"]["empty_file"]
        == before["requests"].get("client_error", {}).get("empty_file", 0) + 1
    )
    assert after["audio_seconds"] > before["audio_seconds"]
    assert after["batches"] == before["batches"] + 1  # the empty file never reached the scheduler
    for key in ("latency_ms", "queue_wait_ms", "batch_compute_ms"):
        assert after[key]["p50"] is not None and after[key]["p50"] <= after[key]["p99"], key
    assert after["mean_rtf"] > 0 and after["mean_batch_size"] >= 1
    assert after["status"] == "ready" and after["providers"] == ["CPUExecutionProvider"]
    assert after["queue"]["depth"] == 0 and after["queue"]["capacity"] == 64
    assert stats["default_model"] == DEFAULT_MODEL and stats["uptime_s"] > 0
    assert 50 < stats["rss_mb"] <= stats["peak_rss_mb"] < 4096
    metrics = httpx.get(f"{server}/metrics").text
    m = DEFAULT_MODEL
    assert f'asr_requests_total{{code="empty_file",model="{m}",outcome="client_error"}} ' in metrics
    assert f'asr_requests_total{{code="",model="{m}",outcome="ok"}} ' in metrics
    for name in (
        "asr_request_duration_seconds",
        "asr_queue_wait_seconds",
        "asr_batch_compute_seconds",
        "asr_batch_size",
    ):
        assert f'{name}_bucket{{le="+Inf",model="{m}"}} ' in metrics, name
    assert f'asr_queue_depth{{model="{m}"}} 0.0' in metrics
    assert f'asr_model_ready{{model="{m}"}} 1.0' in metrics
    assert "process_resident_memory_bytes " in metrics


def test_health_answers_while_a_long_file_decodes(server: str, clips: list[Path]) -> None:
    """The event loop stays free: /health is answered while a long transcription is running."""
    x, sr = sf.read(str(clips[3]), dtype="float32")
    long = np.tile(x, int(55 * sr / x.size))  # ~55 s, under the server's 60 s limit
    data = wav_bytes(long, sr, "PCM_16")
    done = threading.Event()
    result: dict[str, int] = {}

    def slow() -> None:
        result["status"] = post(server, data).status_code
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    answered_during = 0
    while not done.is_set():
        r = httpx.get(f"{server}/health", timeout=5)
        assert r.status_code == 200
        if not done.is_set():
            answered_during += 1
    t.join()
    assert result["status"] == 200
    assert answered_during >= 1


# --- bad input -----------------------------------------------------------------------------


def test_no_file(server: str) -> None:
    assert_error(httpx.post(f"{server}/transcribe"), 400, "missing_file")
    assert_error(httpx.post(f"{server}/transcribe", files={"audio": ("a.wav", b"x")}), 400, "missing_file")
    assert_error(
        httpx.post(f"{server}/transcribe", content=b"RIFF....", headers={"content-type": "audio/wav"}),
        400,
        "missing_file",
    )


def test_empty_file(server: str) -> None:
    assert_error(post(server, b""), 400, "empty_file")


def test_not_audio(server: str) -> None:
    assert_error(post(server, b"this is a text file, not audio\n" * 10, "notes.wav"), 415, "unsupported_format")
    assert_error(post(server, Path(__file__).read_bytes(), "x.wav"), 415, "unsupported_format")


def test_truncated_wav(server: str, clips: list[Path]) -> None:
    data = clips[0].read_bytes()
    assert_error(post(server, data[: len(data) // 2]), 400, "truncated_audio")
    assert_error(post(server, data[:30]), 400, "truncated_audio")


def test_corrupt_header(server: str, clips: list[Path]) -> None:
    data = bytearray(clips[0].read_bytes())
    data[20:36] = b"\xff" * 16  # garbage fmt chunk: format tag, channels, rate...
    r = post(server, bytes(data))
    assert r.status_code in (400, 415), r.text
    assert r.json()["error"]["code"] in ("corrupt_audio", "unsupported_format")


def test_header_only_wav(server: str) -> None:
    assert_error(post(server, wav_bytes(np.zeros(0, dtype=np.int16), 16000, "PCM_16")), 400, "empty_audio")


def test_too_short(server: str) -> None:
    assert_error(post(server, wav_bytes(np.zeros(400, dtype=np.int16), 16000, "PCM_16")), 400, "audio_too_short")


def test_too_long(server: str) -> None:
    # 61 s of silence against the server's 60 s limit: refused from the header, before decoding.
    assert_error(post(server, wav_bytes(np.zeros(61 * 8000, dtype=np.int16), 8000, "PCM_16")), 413, "audio_too_long")


def test_nan_samples(server: str) -> None:
    x = np.zeros(16000, dtype=np.float32)
    x[100] = np.nan
    assert_error(post(server, wav_bytes(x, 16000, "FLOAT")), 400, "invalid_samples")
    x[100] = np.inf
    assert_error(post(server, wav_bytes(x, 16000, "FLOAT")), 400, "invalid_samples")


def test_absurd_float_amplitude(server: str) -> None:
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 1e30
    assert_error(post(server, wav_bytes(x, 16000, "FLOAT")), 400, "invalid_samples")


@pytest.mark.parametrize(
    "rate,channels,subtype",
    [
        (1, 1, "PCM_16"),
        (3, 1, "PCM_16"),
        (1_000_000, 1, "PCM_16"),
        (16000, 64, "PCM_16"),
        (8000, 1, "ULAW"),
        (16000, 1, "IMA_ADPCM"),
        (16000, 1, "PCM_U8"),
    ],
)
def test_unusual_but_valid_wavs(server: str, rate: int, channels: int, subtype: str) -> None:
    n = rate if rate > 100 else 30  # 1 s, or 30 samples (10-30 s) at absurdly low rates
    x = 0.1 * np.random.default_rng(1).standard_normal((n, channels))
    r = post(server, wav_bytes(x, rate, subtype))
    assert r.status_code == 200, r.text
    # ADPCM rounds up to whole blocks, so allow a few tens of milliseconds.
    assert r.json()["duration_s"] == pytest.approx(n / rate, abs=0.05)


def test_unknown_model(server: str, clips: list[Path]) -> None:
    assert_error(post(server, clips[0].read_bytes(), model="nope"), 404, "model_not_found")


def test_wrong_method_and_path(server: str) -> None:
    assert_error(httpx.get(f"{server}/transcribe"), 405, "method_not_allowed")
    assert_error(httpx.get(f"{server}/nothing-here"), 404, "not_found")


def test_malformed_multipart(server: str) -> None:
    r = httpx.post(
        f"{server}/transcribe",
        content=b"--xyz\r\nnot a part\r\n",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]


def test_too_large_upload(clips: list[Path]) -> None:
    with running_server(default_env(ASR_MAX_UPLOAD_MB="0.05")) as url:
        big = np.zeros(16000 * 5, dtype=np.int16)  # 160 kB > 50 kB
        assert_error(post(url, wav_bytes(big, 16000, "PCM_16")), 413, "file_too_large")
        # Still serving after refusing.
        assert post(url, wav_bytes(np.zeros(8000, dtype=np.int16), 16000, "PCM_16")).status_code == 200


def test_broken_model_reports_503_with_reason(clips: list[Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(Settings().model_dir, models)
    onnx = models / DEFAULT_MODEL / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])  # cut: checksum no longer matches
    with running_server(default_env(ASR_MODEL_DIR=str(models))) as url:
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and h.json()["status"] == "failed"
        assert "checksum" in h.json()["reason"]
        assert_error(post(url, clips[0].read_bytes()), 503, "model_unavailable")


def test_missing_model_reports_503(clips: list[Path], tmp_path: Path) -> None:
    with running_server(default_env(ASR_DEFAULT_MODEL="absent")) as url:
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and "absent" in h.json()["reason"]


def test_riff_size_unknown_is_accepted(server: str, clips: list[Path]) -> None:
    """Streaming writers leave the data size as 0xFFFFFFFF: not truncation."""
    data = bytearray(clips[0].read_bytes())
    pos = data.find(b"data")
    data[pos + 4 : pos + 8] = struct.pack("<I", 0xFFFFFFFF)
    r = post(server, bytes(data))
    assert r.status_code == 200, r.text


def test_silence_and_dc_give_a_defined_result(server: str) -> None:
    """Digital silence and a pure DC offset are valid audio: 200 with a string, never NaN or 500."""
    for x in (np.zeros(16000, dtype=np.float32), np.full(16000, 0.5, dtype=np.float32)):
        r = post(server, wav_bytes(x, 16000, "FLOAT"))
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["text"], str) and r.json()["rtf"] >= 0


def test_liveness_readiness_and_request_ids(server: str, clips: list[Path]) -> None:
    assert httpx.get(f"{server}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{server}/health/ready").status_code == 200
    r = httpx.post(
        f"{server}/transcribe",
        files={"file": ("a.wav", clips[0].read_bytes())},
        headers={"X-Request-ID": "client-chosen-42"},
    )
    assert r.headers["X-Request-ID"] == "client-chosen-42"
    generated = post(server, b"").headers["X-Request-ID"]
    assert len(generated) == 32 and generated != "client-chosen-42"


def test_one_json_log_line_per_request(clips: list[Path]) -> None:
    import json

    logs: list[str] = []
    env = default_env(ASR_LOG_FORMAT="json", ASR_LOG_LEVEL="info")
    with running_server(env, output=logs) as url:
        httpx.post(
            f"{url}/transcribe",
            files={"file": ("a.wav", clips[0].read_bytes())},
            headers={"X-Request-ID": "rid-1"},
        )
        httpx.post(f"{url}/transcribe", files={"file": ("a.wav", b"")}, headers={"X-Request-ID": "rid-2"})
    out = logs[0].strip().splitlines()
    lines = [json.loads(line) for line in out]  # every line is JSON (json.loads raises otherwise)
    reqs = {d["request_id"]: d for d in lines if d.get("msg") == "request"}
    assert reqs["rid-1"]["status"] == 200 and reqs["rid-1"]["audio_s"] > 0 and reqs["rid-1"]["path"] == "/transcribe"
    assert reqs["rid-2"]["status"] == 400 and reqs["rid-2"]["error_code"] == "empty_file"
    # Healthy probes log at debug. The 503s that running_server's readiness polling may get
    # while the model loads are logged at info on purpose (an operator wants to see those).
    assert not any(d.get("path") == "/health" and d["status"] == 200 for d in reqs.values())


def test_openai_client_takes_default_and_every_listed_model(server: str, clips: list[Path]) -> None:
    """A new user's first guess (model="default") works, as do the ids /v1/models lists."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert DEFAULT_MODEL in ids and client.models.retrieve("default").id == DEFAULT_MODEL
    native = post(server, clips[7].read_bytes()).json()["text"]
    for model in ["default", "whisper-1", *ids]:
        with clips[7].open("rb") as f:
            assert client.audio.transcriptions.create(model=model, file=f).text == native, model
    with pytest.raises(openai.NotFoundError), clips[7].open("rb") as f:
        client.audio.transcriptions.create(model="no-such-model", file=f)
