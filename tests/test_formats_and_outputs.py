"""Any audio in, rich transcripts out, over real HTTP: formats detected from the bytes, raw PCM,
word timings / SRT / WebVTT / verbose JSON, the batch endpoint, and the official ``openai``
client against the OpenAI-compatible surface."""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import soxr

from service.decoding import SEGMENT_MAX_S, Word, segment_words
from service.formats import srt
from testkit.server import running_server
from tests.conftest import NemoModel
from tests.test_api import assert_error, model_env, post


@pytest.fixture(scope="module")
def server(conformer: NemoModel) -> Iterator[str]:
    with running_server(model_env(conformer)) as url:
        yield url


def load(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000
    return x


def encode(x: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


# --- audio in ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,subtype,rate,channels",
    [
        ("MP3", "MPEG_LAYER_III", 44100, 2),
        ("OGG", "OPUS", 48000, 1),
        ("OGG", "VORBIS", 22050, 2),
        ("FLAC", "PCM_24", 48000, 2),
        ("AIFF", "PCM_16", 16000, 1),
    ],
)
def test_compressed_formats_decode_and_transcribe(
    server: str, conformer: NemoModel, fmt: str, subtype: str, rate: int, channels: int
) -> None:
    """Each container is named from its bytes (the file name lies), decoded, downmixed, resampled."""
    speech = load(conformer.files[2])
    x = soxr.resample(speech, 16000, rate)
    if channels == 2:
        x = np.stack([x, 0.8 * x], axis=1)
    r = post(server, encode(x, rate, fmt, subtype), filename="recording.wav")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["audio"]["format"] == ("OGG" if fmt == "OGG" else fmt)
    assert body["audio"]["subtype"] == subtype and body["audio"]["sample_rate"] == rate
    assert body["audio"]["channels"] == channels
    assert abs(body["duration_s"] - speech.shape[0] / 16000) < 0.1
    if fmt in ("FLAC", "AIFF") and rate == 16000:
        assert body["text"] == conformer.transcripts[2]  # lossless at the model's rate: NeMo's exact text
    else:
        assert body["text"]  # lossy or resampled: the random model still says something


def test_raw_pcm_with_parameters(server: str, conformer: NemoModel) -> None:
    speech = load(conformer.files[0])
    pcm16 = (np.clip(speech, -1, 1) * 32767).astype("<i2")
    wav = post(server, encode(pcm16.astype(np.float32) / 32768, 16000, "WAV", "PCM_16")).json()["text"]
    r = post(server, pcm16.tobytes(), filename="x.raw", sample_rate="16000")  # s16le, mono by default
    assert r.status_code == 200, r.text
    assert r.json()["audio"]["format"] == "RAW" and r.json()["text"] == wav
    stereo = np.stack([speech, speech], 1).astype("<f4")
    r = post(server, stereo.tobytes(), sample_rate="16000", encoding="f32le", channels="2")
    assert r.status_code == 200 and r.json()["audio"]["channels"] == 2, r.text
    assert r.json()["text"] == conformer.transcripts[0]
    # audio/L16 content type (RFC 2586, big-endian), parameters in the part's Content-Type.
    be = pcm16.astype(">i2").tobytes()
    r = httpx.post(f"{server}/transcribe", files={"file": ("x", be, "audio/L16;rate=16000")}, timeout=60)
    assert r.status_code == 200 and r.json()["text"] == wav, r.text


@pytest.mark.parametrize(
    "data,found",
    [
        (b"\x00\x00\x00\x20ftypM4A " + bytes(200), "MP4/M4A"),
        (b"\x1aE\xdf\xa3" + bytes(200), "WebM/Matroska"),
        (b"#!AMR\n" + bytes(200), "AMR"),
        (b'{"audio": "not really"}' * 10, "text"),
        (bytes(range(7, 250)) * 4, "no known audio header"),
    ],
)
def test_unsupported_formats_are_named(server: str, data: bytes, found: str) -> None:
    r = post(server, data, filename="speech.wav")
    assert_error(r, 415, "unsupported_format")
    assert found in r.json()["error"]["message"]


def test_raw_parameters_are_validated(server: str) -> None:
    assert_error(post(server, bytes(32000), sample_rate="16000", encoding="s13le"), 400, "invalid_raw_format")
    assert_error(post(server, bytes(32000), sample_rate="5"), 400, "invalid_raw_format")
    assert_error(post(server, bytes(32000), encoding="s16le"), 400, "invalid_raw_format")
    assert_error(post(server, bytes(32000), sample_rate="16000", channels="0"), 400, "invalid_raw_format")


def test_corrupt_compressed_file(server: str, conformer: NemoModel) -> None:
    good = encode(load(conformer.files[1]), 16000, "OGG", "VORBIS")
    broken = good[:60] + bytes(len(good) - 60)  # header survives, the stream is zeros
    r = post(server, broken)
    assert r.status_code in (400, 415), r.text
    assert r.json()["error"]["code"] in ("corrupt_audio", "unsupported_format", "empty_audio")


def test_degenerate_signals_give_defined_results(server: str) -> None:
    """Near-silence, clipping, DC, a single-sample file: 200 with finite output, or a clear 4xx."""
    rng = np.random.default_rng(0)
    cases = {
        "near_silent": 1e-6 * rng.standard_normal(16000),
        "clipped": np.clip(10 * rng.standard_normal(16000), -1, 1),
        "dc": np.full(16000, 0.7),
        "square": np.sign(np.sin(np.arange(16000) * 0.05)),
    }
    for name, x in cases.items():
        r = post(server, encode(x.astype(np.float32), 16000, "WAV", "FLOAT"), response_format="verbose_json")
        assert r.status_code == 200, (name, r.text)
        for w in r.json()["words"]:
            assert np.isfinite([w["start"], w["end"], w["confidence"]]).all(), name
    assert_error(post(server, encode(np.zeros(1, np.float32), 16000, "WAV", "FLOAT")), 400, "audio_too_short")


# --- rich output -----------------------------------------------------------------------------

SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"


def seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_verbose_json_words_and_segments(server: str, conformer: NemoModel) -> None:
    path = conformer.files[3]
    r = post(server, path.read_bytes(), response_format="verbose_json")
    assert r.status_code == 200, r.text
    body = r.json()
    words, segments = body["words"], body["segments"]
    assert body["text"] == conformer.transcripts[3]
    # Word timings in seconds are NeMo's (tests/test_nemo_parity.py checks the frames).
    nemo = [w for w in conformer.words[3] if w["word"].strip()]
    assert [w["word"] for w in words] == [w["word"].strip() for w in nemo]
    for w, n in zip(words, nemo, strict=True):
        assert abs(w["start"] - n["start"]) < 1e-3 and abs(w["end"] - n["end"]) < 1e-3
        assert 0 <= w["confidence"] <= 1
    assert " ".join(s["text"] for s in segments) == " ".join(w["word"] for w in words)
    for a, b in itertools.pairwise(segments):
        assert a["end"] <= b["start"] + 1e-6
    assert segments[-1]["end"] <= body["duration_s"] + 0.05


def test_text_srt_vtt(server: str, conformer: NemoModel) -> None:
    wav = conformer.files[5].read_bytes()
    r = post(server, wav, response_format="text")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == conformer.transcripts[5] + "\n"

    srt = post(server, wav, response_format="srt")
    assert srt.status_code == 200 and srt.headers["content-type"].startswith("application/x-subrip")
    cues = srt.text.strip().split("\n\n")
    assert cues and all(c.split("\n")[0] == str(i) for i, c in enumerate(cues, 1))
    times = [re.match(rf"{SRT_TIME} --> {SRT_TIME}$", c.split("\n")[1]) for c in cues]
    assert all(times)
    spans = [(seconds(*m.groups()[:4]), seconds(*m.groups()[4:])) for m in times if m]
    assert all(a < b for a, b in spans) and all(p[1] <= n[0] for p, n in itertools.pairwise(spans))
    text = " ".join(" ".join(c.split("\n")[2:]) for c in cues)
    assert text.split() == conformer.transcripts[5].split()

    vtt = post(server, wav, response_format="vtt")
    assert vtt.status_code == 200 and vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith("WEBVTT\n\n")
    assert re.search(r"\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d", vtt.text)
    assert_error(post(server, wav, response_format="mp3"), 400, "invalid_response_format")


def test_segments_split_at_pauses_and_start_with_the_speech() -> None:
    """The segmenting rule on known word timings (a random model's words carry no pauses to find).

    NeMo's word offsets make consecutive words touch, so a word after a pause "starts" when the
    previous word ended; a segment starts when its first token is emitted instead.
    """

    def word(text: str, start: float, end: float, speech_start: float, pause: float) -> Word:
        return Word(text, start, end, 0.9, round(start / 0.04), round(end / 0.04), speech_start, pause)

    words = [
        word("hello", 0.0, 0.4, 0.0, 0.0),
        word("there", 0.4, 0.8, 0.45, 0.0),
        word("after", 0.8, 4.2, 3.9, 3.0),  # three seconds of silence before it
        word("the", 4.2, 4.4, 4.25, 0.0),
        word("pause.", 4.4, 4.9, 4.5, 0.0),
        word("next", 4.9, 5.3, 5.0, 0.0),  # after a sentence mark
    ]
    segs = segment_words(words)
    assert [s.text for s in segs] == ["hello there", "after the pause.", "next"]
    assert [s.start for s in segs] == [0.0, 3.9, 5.0]
    assert [s.end for s in segs] == [0.8, 4.9, 5.3]
    assert "00:00:03,900 --> 00:00:04,900" in srt(segs)
    long = [word(f"w{i}", i * 0.5, i * 0.5 + 0.5, i * 0.5, 0.0) for i in range(60)]  # 30 s without a pause
    assert all(s.end - s.start <= SEGMENT_MAX_S + 0.5 for s in segment_words(long))


# --- batch ---------------------------------------------------------------------------------


def test_batch_one_result_per_file(server: str, conformer: NemoModel) -> None:
    files = [
        ("files", ("a.wav", conformer.files[0].read_bytes())),
        ("files", ("bad.txt", b"this is not audio at all, just a text file")),
        ("files", ("c.wav", conformer.files[4].read_bytes())),
        ("files", ("empty.wav", b"")),
    ]
    r = httpx.post(f"{server}/transcribe/batch", files=files, timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.wav", "bad.txt", "c.wav", "empty.wav"]
    assert [x["status"] for x in results] == [200, 415, 200, 400]
    assert results[0]["result"]["text"] == conformer.transcripts[0]
    assert results[2]["result"]["text"] == conformer.transcripts[4]
    assert results[1]["error"]["code"] == "unsupported_format" and results[3]["error"]["code"] == "empty_file"
    assert_error(httpx.post(f"{server}/transcribe/batch", data={"model": "x"}, timeout=30), 400, "missing_file")


# --- the OpenAI client, unchanged except base_url ---------------------------------------------


def test_openai_client(server: str, conformer: NemoModel) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert conformer.name in ids
    path = conformer.files[7]
    with path.open("rb") as f:
        t = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert t.text == conformer.transcripts[7]
    with path.open("rb") as f:
        t = client.audio.transcriptions.create(
            model=conformer.name, file=f, language="en", prompt="ignored", temperature=0.3
        )
    assert t.text == conformer.transcripts[7]
    with path.open("rb") as f:
        v = client.audio.transcriptions.create(
            model=conformer.name, file=f, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    assert v.text == conformer.transcripts[7] and v.words and v.segments
    assert [w.word for w in v.words] == v.text.split()
    assert v.duration > 0 and all(w.end >= w.start for w in v.words)
    with path.open("rb") as f:
        srt = client.audio.transcriptions.create(model=conformer.name, file=f, response_format="srt")
    assert isinstance(srt, str) and " --> " in srt
    with pytest.raises(openai.NotFoundError), path.open("rb") as f:
        client.audio.transcriptions.create(model="no-such-model", file=f)
    with pytest.raises(
        openai.UnsupportedMediaTypeError if hasattr(openai, "UnsupportedMediaTypeError") else openai.APIStatusError
    ) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.mp3", b"plain text, not audio"))
    assert e.value.status_code == 415
