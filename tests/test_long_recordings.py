"""Long recordings on the trained default model, through the real server: cut at pauses, each
utterance heard as the model was trained to hear it; no words (and no compute) where there is no
speech; memory bounded by the segment, not the file."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import jiwer
import numpy as np
import pytest
import soundfile as sf

from service.audio import read_audio
from testkit.server import running_server
from testkit.speech import HELDOUT_SENTENCES, synthesize_heldout
from tests.test_api import DEFAULT_MODEL

PAUSE_S = 0.45


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server({}) as url:
        yield url


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    return [read_audio(p, 16000)[0] for p in synthesize_heldout(tmp_path_factory.mktemp("heldout"))]


def wav(x: np.ndarray, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, 16000, subtype=subtype, format="WAV")
    return buf.getvalue()


def transcribe(url: str, x: np.ndarray, **form: str) -> dict:
    r = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", wav(x))}, data=form or None, timeout=600)
    assert r.status_code == 200, r.text
    return dict(r.json())


def batches(url: str) -> int:
    return int(httpx.get(f"{url}/stats").json()["models"][DEFAULT_MODEL]["batches"])


def test_sentences_in_one_recording_as_well_as_one_by_one(server: str, heldout: list[np.ndarray]) -> None:
    """The issue's guard: held-out sentences with pauses, within 2 points of WER of the same one by one."""
    one_by_one = [transcribe(server, x)["text"] for x in heldout]
    pause = np.zeros(int(PAUSE_S * 16000), np.float32)
    recording = np.concatenate([np.concatenate([x, pause]) for x in heldout])
    body = transcribe(server, recording, response_format="verbose_json")
    wer_one = jiwer.wer(HELDOUT_SENTENCES, one_by_one)
    wer_long = jiwer.wer(" ".join(HELDOUT_SENTENCES), body["text"])
    print(f"{len(heldout)} sentences: one by one {100 * wer_one:.1f} %, as one recording {100 * wer_long:.1f} %")
    assert wer_long - wer_one <= 0.02
    assert body["chunks"] >= len(heldout) // 2  # cut at the pauses
    # Word times are the recording's: in order, inside it, each sentence's words inside its own span.
    starts = [w["start"] for w in body["words"]]
    assert starts == sorted(starts) and body["words"][-1]["end"] <= recording.shape[0] / 16000 + 0.05
    first_start, pos = [], 0
    for x in heldout:
        first_start.append(pos / 16000)
        pos += x.shape[0] + pause.shape[0]
    segment_starts = [s["start"] for s in body["segments"]]
    for t in first_start[1:]:  # every sentence starts a caption segment, near where it starts
        assert any(abs(s - t) < 0.3 for s in segment_starts), (t, segment_starts)


def test_no_speech_gives_no_words_and_no_compute(server: str) -> None:
    rng = np.random.default_rng(7)
    n = 600 * 16000  # ten minutes
    brown = np.cumsum(rng.standard_normal(n))
    brown -= np.convolve(brown, np.ones(1601) / 1601, mode="same")  # room rumble, not a random walk off scale
    recordings = {
        "digital silence": np.zeros(n, np.float32),
        "near-silence (1-LSB dither)": rng.integers(-1, 2, n).astype(np.float32) / 32768,
        "white noise at -26 dBFS": rng.standard_normal(n).astype(np.float32) * 10 ** (-26 / 20),
        "room tone": (0.03 * brown / np.abs(brown).max()).astype(np.float32),
    }
    before = batches(server)
    for name, x in recordings.items():
        for seconds in (3, 30, 600):
            body = transcribe(server, x[: seconds * 16000])
            assert body["text"] == "", (name, seconds, body["text"])
    assert batches(server) == before  # not one of them reached the model


def test_speech_between_long_silences_keeps_its_time(server: str, heldout: list[np.ndarray]) -> None:
    """Three sentences in five minutes of near-silence: only they are recognized, at their times."""
    rng = np.random.default_rng(3)
    x = (rng.integers(-1, 2, 300 * 16000) / 32768).astype(np.float32)
    at = [20.0, 150.0, 280.0]
    for t, clip in zip(at, heldout[:3], strict=True):
        x[int(t * 16000) : int(t * 16000) + clip.shape[0]] += clip
    before = batches(server)
    body = transcribe(server, x, response_format="verbose_json")
    assert batches(server) - before == 3
    assert len(body["segments"]) >= 3
    for t in at:
        assert any(t - 0.2 <= s["start"] <= t + 0.5 for s in body["segments"]), (t, body["segments"])
    assert jiwer.wer(" ".join(HELDOUT_SENTENCES[:3]), body["text"]) < 0.3


def test_twenty_minute_recording_in_bounded_memory(server: str, heldout: list[np.ndarray]) -> None:
    """Peak RSS grows by no more after a 20-minute recording than after a 3-minute one: only a
    segment is held at a time (the 20-minute file is 77 MB as float32 samples)."""
    pause = np.zeros(int(PAUSE_S * 16000), np.float32)
    block = np.concatenate([np.concatenate([x, pause]) for x in heldout])
    x = np.tile(block, int(np.ceil(1200 * 16000 / block.shape[0])))[: 1200 * 16000]
    transcribe(server, x[: 180 * 16000])
    peak_short = httpx.get(f"{server}/stats").json()["peak_rss_mb"]
    body = transcribe(server, x)
    peak_long = httpx.get(f"{server}/stats").json()["peak_rss_mb"]
    print(f"peak RSS after 3 min: {peak_short} MB, after 20 min: {peak_long} MB; {body['chunks']} segments")
    assert abs(body["duration_s"] - 1200) < 0.01 and len(body["text"].split()) > 2000
    assert peak_long - peak_short < 40
