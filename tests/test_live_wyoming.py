"""The Wyoming server (Home Assistant's protocol) with the ``wyoming`` package's own client."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info

from testkit.server import free_port, running_server
from testkit.speech import SENTENCES, synthesize


@pytest.fixture(scope="module")
def wyoming() -> Iterator[tuple[str, int]]:
    port = free_port()
    with running_server({"ASR_WYOMING_PORT": str(port), "ASR_STREAM_IDLE_TIMEOUT_S": "3"}) as url:
        yield url, port


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    f = synthesize(SENTENCES[2], "en-us", 150, tmp_path_factory.mktemp("wy") / "s.wav")
    x, _ = sf.read(f, dtype="int16")
    return f, x


async def converse(port: int, events: list[Event], until: str = "transcript-stop") -> list[Event]:
    got: list[Event] = []
    async with AsyncTcpClient("127.0.0.1", port) as c:
        for ev in events:
            await c.write_event(ev)
        while True:
            ev = await asyncio.wait_for(c.read_event(), 20)
            if ev is None:
                return got
            got.append(ev)
            if ev.type in (until, "error"):
                return got


def audio_events(x: np.ndarray, rate: int = 16000, channels: int = 1) -> list[Event]:
    out = [AudioStart(rate=rate, width=2, channels=channels).event()]
    step = rate // 10 * channels
    out += [
        AudioChunk(rate=rate, width=2, channels=channels, audio=x[i : i + step].tobytes()).event()
        for i in range(0, len(x), step)
    ]
    return [*out, AudioStop().event()]


def test_describe_lists_the_models(wyoming: tuple[str, int]) -> None:
    got = asyncio.run(converse(wyoming[1], [Describe().event()], until="info"))
    info = Info.from_event(got[-1])
    program = info.asr[0]
    assert program.supports_transcript_streaming and program.installed
    assert [m.name for m in program.models] == ["en_synth_conformer_ctc"]
    assert program.models[0].languages == ["en"]


def test_transcribe_streams_chunks_then_the_transcript(
    wyoming: tuple[str, int], speech: tuple[Path, np.ndarray]
) -> None:
    url, port = wyoming
    f, x = speech
    got = asyncio.run(converse(port, [Transcribe(language="en").event(), *audio_events(x)]))
    types = [e.type for e in got]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"], types
    assert TranscriptStart.from_event(got[0]).language == "en"
    chunks = [TranscriptChunk.from_event(e).text for e in got if e.type == "transcript-chunk"]
    assert len(chunks) >= 2  # words while the audio was still arriving
    final = Transcript.from_event(got[-2]).text
    r = httpx.post(f"{url}/transcribe", files={"file": f.read_bytes()})
    assert final == r.json()["text"]  # the same words as an upload of the same audio
    assert TranscriptStop.is_type(got[-1].type)


def test_other_rates_and_stereo(wyoming: tuple[str, int], speech: tuple[Path, np.ndarray]) -> None:
    import soxr

    url, port = wyoming
    f, x = speech
    ref = httpx.post(f"{url}/transcribe", files={"file": f.read_bytes()}).json()["text"]
    x22 = (soxr.resample(x.astype(np.float32) / 32768, 16000, 22050) * 32767).astype("<i2")
    stereo = np.stack([x22, x22], axis=1).reshape(-1)
    got = asyncio.run(converse(port, audio_events(stereo, rate=22050, channels=2)))
    final = Transcript.from_event(got[-2]).text
    assert final.split()[:3] == ref.split()[:3]


def raw(port: int, data: bytes) -> list[dict]:
    """Write raw bytes; return the JSON headers the server sends back before it closes."""

    async def main() -> list[dict]:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(data)
        await w.drain()
        out = []
        while line := await asyncio.wait_for(r.readline(), 10):
            head = json.loads(line)
            if head.get("data_length"):
                head["data"] = {**head.get("data", {}), **json.loads(await r.readexactly(head["data_length"]))}
            out.append(head)
        w.close()
        return out

    return asyncio.run(main())


def error_code(events: list[dict]) -> str:
    assert events and events[-1]["type"] == "error", events
    assert events[-1]["data"]["text"]
    return str(events[-1]["data"]["code"])


def test_bad_input_gets_an_error_event_and_the_server_stays_up(wyoming: tuple[str, int]) -> None:
    url, port = wyoming
    assert error_code(raw(port, b"this is not json\n")) == "invalid_json"
    assert error_code(raw(port, b'{"no": "type"}\n')) == "invalid_event"
    assert error_code(raw(port, b'{"type": "audio-chunk", "payload_length": 99999999999}\n')) == "event_too_large"
    assert error_code(raw(port, b"x" * 70_000 + b"\n")) == "event_too_large"
    assert (
        error_code(raw(port, b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}}\n'))
        == "no_audio_start"
    )
    start8 = b'{"type": "audio-start", "data": {"rate": 16000, "width": 1, "channels": 1}}\n'
    assert error_code(raw(port, start8)) == "unsupported_audio"
    start_ok = b'{"type": "audio-start", "data": {"rate": 16000, "width": 2, "channels": 1}}\n'
    odd = b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": 3}\nabc'
    events = raw(port, start_ok + odd)
    assert events[0]["type"] == "transcript-start" and error_code(events) == "invalid_audio"
    bad_model = b'{"type": "transcribe", "data": {"name": "nope"}}\n' + start_ok
    assert error_code(raw(port, bad_model)) == "model_not_found"
    assert error_code(raw(port, start_ok)) == "idle_timeout"  # then says nothing
    # A client that vanishes mid-utterance
    raw(
        port,
        start_ok
        + b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": 3200}\n'
        + b"\0" * 100,
    )
    assert httpx.get(f"{url}/health").status_code == 200
    for _ in range(50):
        if httpx.get(f"{url}/stats").json()["live"]["active"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(f"{url}/stats").json()["live"]["active"] == 0


def test_shutdown_mid_transcription_sends_the_transcript_then_says_so(speech: tuple[Path, np.ndarray]) -> None:
    """A draining server (service.drain) whose timeout is near ends the utterance in progress as
    an audio-stop would: the transcript of what it heard, then the shutdown error."""
    _, x = speech
    part = x[: len(x) * 2 // 3]
    port = free_port()
    proc: list[subprocess.Popen[str]] = []
    with running_server({"ASR_WYOMING_PORT": str(port), "ASR_SHUTDOWN_TIMEOUT_S": "3"}, process=proc) as url:
        wav = io.BytesIO()
        sf.write(wav, part, 16000, format="WAV", subtype="PCM_16")
        r = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": wav.getvalue()}, data={"model": "default"})
        expected = r.json()["text"].strip()

        async def main() -> list[Event]:
            got: list[Event] = []
            async with AsyncTcpClient("127.0.0.1", port) as c:
                for ev in audio_events(part)[:-1]:  # audio-start and the audio, no stop
                    await c.write_event(ev)
                await asyncio.sleep(0.5)
                proc[0].send_signal(signal.SIGTERM)
                while (ev := await asyncio.wait_for(c.read_event(), 20)) is not None:
                    got.append(ev)
            return got

        got = asyncio.run(main())
        transcripts = [Transcript.from_event(e).text for e in got if Transcript.is_type(e.type)]
        assert transcripts == [expected]
        assert got[-1].type == "error" and Error.from_event(got[-1]).code == "shutting_down"
        assert proc[0].wait(30) in (0, -signal.SIGTERM)
