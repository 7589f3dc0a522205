"""OpenAI Realtime transcription sessions on the real server: the official SDK, raw
WebSocket clients for what the SDK does not send (the beta event, bad input), limits."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jiwer
import numpy as np
import pytest
import soundfile as sf
import soxr
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

from testkit.rolling import pcm16
from testkit.server import running_server


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server({"ASR_STREAM_MAX": "4", "ASR_STREAM_IDLE_TIMEOUT_S": "3"}) as url:
        yield url


def ws_url(url: str, query: str = "intent=transcription") -> str:
    return url.replace("http://", "ws://") + "/v1/realtime?" + query


def offline(url: str, x: np.ndarray) -> str:
    buf = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    f = buf / f"rt-{id(x)}.wav"
    sf.write(f, x, 16000, subtype="PCM_16")
    r = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": f.read_bytes()}, data={"model": "default"})
    f.unlink()
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


async def sdk_session(url: str, audio: bytes, session: dict[str, Any], commit: bool, turns: int) -> list[Any]:
    """Send ``audio`` in 100 ms appends through the SDK; return every server event up to ``turns`` completions."""
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    events: list[Any] = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        events.append(await conn.recv())
        await conn.session.update(session=session)
        rate = ((session["audio"]["input"].get("format") or {}).get("rate")) or 24000
        step = rate // 10 * 2
        for i in range(0, len(audio), step):
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i : i + step]).decode())
        if commit:
            await conn.input_audio_buffer.commit()
        done = 0
        async for ev in conn:
            events.append(ev)
            assert ev.type != "error", ev
            if ev.type == "conversation.item.input_audio_transcription.completed":
                done += 1
                if done == turns:
                    break
    return events


def test_sdk_manual_commit_at_16k_gives_the_offline_transcript(server: str, sentences: list) -> None:
    x, _ = sentences[0]
    session = {
        "type": "transcription",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None,
                            "transcription": {"model": "gpt-4o-transcribe"}}},
    }  # fmt: skip
    events = asyncio.run(sdk_session(server, pcm16(x), session, commit=True, turns=1))
    types = [e.type for e in events]
    assert types[0] == "session.created" and "session.updated" in types
    assert types.index("input_audio_buffer.committed") < types.index("conversation.item.added")
    updated = next(e for e in events if e.type == "session.updated")
    assert updated.session.audio.input.turn_detection is None
    assert updated.session.audio.input.format.rate == 16000
    completed = events[-1]
    assert completed.transcript == offline(server, x).strip()
    assert completed.usage.seconds == pytest.approx(len(x) / 16000, abs=0.01)
    deltas = [e.delta for e in events if e.type.endswith(".delta")]
    assert len(deltas) >= 2  # words went out while it was spoken, not only at the end
    assert deltas[0].split()[0] in completed.transcript.split()
    if completed.transcript.startswith("".join(deltas[:-1])):  # the stream agreed with the final text
        assert "".join(deltas) == completed.transcript


def test_sdk_server_vad_at_24k_finds_each_sentence(server: str, sentences: list) -> None:
    parts = []
    for x, _ in sentences:
        parts += [x, np.zeros(16000, np.float32)]
    x24 = soxr.resample(np.concatenate(parts), 16000, 24000)
    session = {
        "type": "transcription",
        "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}},
    }
    events = asyncio.run(sdk_session(server, pcm16(x24), session, commit=False, turns=3))
    started = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    completed = [e for e in events if e.type.endswith(".completed")]
    assert len(started) == len(stopped) == len(completed) == 3
    for s, e, c, (_, text) in zip(started, stopped, completed, sentences, strict=True):
        assert s.item_id == e.item_id == c.item_id
        assert s.audio_start_ms < e.audio_end_ms
        assert jiwer.wer(text.lower(), c.transcript) < 0.35, (text, c.transcript)
    # Turns in order: each starts after the previous one stopped.
    assert all(b.audio_start_ms > a.audio_end_ms - 500 for a, b in zip(stopped, started[1:], strict=False))


Events = list[dict[str, Any]]


def run_raw(
    url: str, script: list[Any], query: str = "intent=transcription", until: str | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    """Send raw messages (str / bytes); collect server events until ``until`` (an event type) or the close."""

    async def main() -> tuple[Events, int | None]:
        events: Events = []
        async with websockets.connect(ws_url(url, query), max_size=None) as ws:
            events.append(json.loads(await ws.recv()))
            for msg in script:
                await ws.send(msg)
            try:
                while True:
                    ev = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    events.append(ev)
                    if until and ev["type"] == until:
                        return events, None
            except websockets.ConnectionClosed as e:
                return events, e.rcvd.code if e.rcvd else None
        return events, None

    return asyncio.run(main())


def append(x: np.ndarray | bytes) -> str:
    data = x if isinstance(x, bytes) else pcm16(x)
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()})


def test_beta_transcription_session_update(server: str, sentences: list) -> None:
    x, _ = sentences[1]
    x24 = soxr.resample(x, 16000, 24000)
    upd = {"type": "transcription_session.update", "session": {"input_audio_format": "pcm16",
           "input_audio_transcription": {"model": "whisper-1", "language": "en"}, "turn_detection": None}}  # fmt: skip
    script = [json.dumps(upd), append(x24), json.dumps({"type": "input_audio_buffer.commit"})]
    events, _ = run_raw(server, script, until="conversation.item.input_audio_transcription.completed")
    updated = next(e for e in events if e["type"] == "transcription_session.updated")
    assert updated["session"]["input_audio_format"] == "pcm16"
    assert updated["session"]["turn_detection"] is None
    assert updated["session"]["input_audio_transcription"]["language"] == "en"
    assert jiwer.wer(sentences[1][1].lower(), events[-1]["transcript"]) < 0.35


def test_g711_ulaw_audio(server: str, sentences: list) -> None:
    x, text = sentences[2]
    x8 = soxr.resample(x, 16000, 8000)
    # Encode with Python's own G.711 encoder where it still exists (audioop, Python < 3.13), else
    # by nearest code of the decoding table (which tests/test_live_engine.py checks against audioop).
    try:
        import audioop

        codes = np.frombuffer(audioop.lin2ulaw(pcm16(x8), 2), np.uint8)
    except ImportError:
        from service.live.audio_in import ULAW

        order = np.argsort(ULAW)
        codes = order[np.clip(np.searchsorted(ULAW[order], x8), 0, 255)].astype(np.uint8)
    upd = {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}},
        },
    }
    script = [json.dumps(upd), append(codes.tobytes()), json.dumps({"type": "input_audio_buffer.commit"})]
    events, _ = run_raw(server, script, until="conversation.item.input_audio_transcription.completed")
    assert jiwer.wer(text.lower(), events[-1]["transcript"]) < 0.35, events[-1]["transcript"]


def update(audio_input: dict[str, Any]) -> str:
    """A current-API session.update with ``session.audio.input`` set to ``audio_input``."""
    return json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_input}}})


def errors(events: list[dict[str, Any]]) -> list[str]:
    return [e["error"]["code"] for e in events if e["type"] == "error"]


def test_bad_events_get_error_events_and_the_session_goes_on(server: str, sentences: list) -> None:
    x, _ = sentences[0]
    script = [
        "{not json",
        b"\x00\x01binary garbage",
        json.dumps([1, 2]),
        json.dumps({"type": "response.create"}),
        json.dumps({"type": "input_audio_buffer.append", "audio": "***not base64***"}),
        json.dumps({"type": "input_audio_buffer.append", "audio": 5}),
        append(b"\x01\x02\x03"),  # odd byte count
        json.dumps({"type": "input_audio_buffer.commit"}),  # nothing to commit
        json.dumps({"type": "session.update", "session": {"type": "realtime"}}),
        update({"format": {"type": "audio/pcm", "rate": 100}}),
        update({"turn_detection": {"type": "magic"}}),
        update({"transcription": {"model": "no-such-model"}}),
        update({"turn_detection": None, "format": {"type": "audio/pcm", "rate": 16000}}),
        append(x),
        json.dumps({"type": "input_audio_buffer.commit"}),
    ]  # fmt: skip
    events, _ = run_raw(server, script, until="conversation.item.input_audio_transcription.completed")
    assert errors(events) == [
        "invalid_json",
        "invalid_event",
        "invalid_event",
        "unknown_event",
        "invalid_value",
        "invalid_value",
        "invalid_audio",
        "input_audio_buffer_commit_empty",
        "invalid_value",
        "invalid_value",
        "invalid_value",
        "model_not_found",
    ]
    for e in events:
        if e["type"] == "error":
            assert e["error"]["message"] and e["error"]["type"] == "invalid_request_error"
    assert events[-1]["transcript"] == offline(server, x).strip()  # the session survived all of it


def test_limits_close_with_clear_codes(server: str, sentences: list) -> None:
    big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (3 * 2**20)})
    events, code = run_raw(server, [big])
    assert errors(events) == ["message_too_large"] and code == 1009
    events, code = run_raw(server, [], query="intent=conversation")
    assert errors(events) == ["invalid_intent"] and code == 1008
    events, code = run_raw(server, [], query="intent=transcription&preset=ludicrous")
    assert errors(events) == ["invalid_preset"] and code == 1008
    events, code = run_raw(server, [])  # says nothing for longer than ASR_STREAM_IDLE_TIMEOUT_S
    assert errors(events) == ["idle_timeout"] and code == 1008


def test_too_many_sessions_are_refused_and_slots_come_back(server: str) -> None:
    async def main() -> None:
        url = ws_url(server)
        held = [await websockets.connect(url) for _ in range(4)]
        for ws in held:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with websockets.connect(url) as extra:
            ev = json.loads(await extra.recv())
            assert ev["type"] == "error" and ev["error"]["code"] == "too_many_streams"
            with pytest.raises(websockets.ConnectionClosed) as e:
                await extra.recv()
            assert e.value.rcvd is not None and e.value.rcvd.code == 1013
        for ws in held:
            await ws.close()
        await asyncio.sleep(0.3)
        async with websockets.connect(url) as again:
            assert json.loads(await again.recv())["type"] == "session.created"

    asyncio.run(main())
    stats = httpx.get(f"{server}/stats").json()["live"]
    assert stats["active"] == 0 and stats["sessions"]["refused"] >= 1
    metrics = httpx.get(f"{server}/metrics").text
    assert 'asr_streams_total{outcome="refused",surface="realtime"}' in metrics
    assert "asr_streams_active 0.0" in metrics


def test_client_vanishing_mid_utterance_frees_its_session(server: str, sentences: list) -> None:
    x, _ = sentences[0]

    async def main() -> None:
        ws = await websockets.connect(ws_url(server))
        await ws.recv()
        await ws.send(append(soxr.resample(x[: len(x) // 2], 16000, 24000)))
        ws.transport.abort()  # no close frame: the client is just gone

    asyncio.run(main())
    for _ in range(50):
        if httpx.get(f"{server}/stats").json()["live"]["active"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert httpx.get(f"{server}/stats").json()["live"]["active"] == 0
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_client_that_stops_reading_is_cut_off(server: str) -> None:
    async def main() -> int | None:
        async with websockets.connect(ws_url(server), max_queue=1) as ws:
            ws.transport.pause_reading()  # the client reads nothing more
            try:
                for _ in range(40_000):  # each draws an error event the client never reads
                    await ws.send("{")
            except websockets.ConnectionClosed:
                pass
            ws.transport.resume_reading()
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None
        return None

    assert asyncio.run(main()) == 1008
    assert httpx.get(f"{server}/health").status_code == 200


def test_api_keys_on_websockets(sentences: list) -> None:
    with running_server({"ASR_API_KEYS": "sekret"}) as url:
        with pytest.raises(websockets.InvalidStatus):
            asyncio.run(websockets.connect(ws_url(url)).__aenter__())

        async def with_key(**kw: Any) -> str:
            async with websockets.connect(ws_url(url), **kw) as ws:
                return str(json.loads(await ws.recv())["type"])

        assert asyncio.run(with_key(additional_headers={"Authorization": "Bearer sekret"})) == "session.created"
        # Browsers cannot set headers: OpenAI's subprotocol carries the key.
        assert asyncio.run(with_key(subprotocols=["realtime", "openai-insecure-api-key.sekret"])) == "session.created"
        with pytest.raises(websockets.InvalidStatus):
            asyncio.run(with_key(subprotocols=["realtime", "openai-insecure-api-key.wrong"]))


# -- fuzz: whatever a client sends, the session answers with events, never a server error -----
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | JSON


FORMAT = st.fixed_dictionaries(
    {},
    optional={
        "type": maybe(st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma"])),
        "rate": maybe(st.sampled_from([8000, 16000, 24000, 48000])),
    },
)
TURNS = st.none() | st.fixed_dictionaries(
    {"type": maybe(st.sampled_from(["server_vad", "semantic_vad"]))},
    optional={"silence_duration_ms": JSON, "prefix_padding_ms": JSON, "threshold": JSON},
)
TRANSCRIPTION = st.fixed_dictionaries(
    {}, optional={"model": maybe(st.just("default")), "language": JSON, "prompt": JSON}
)
AUDIO_INPUT = st.fixed_dictionaries(
    {}, optional={"format": maybe(FORMAT), "turn_detection": maybe(TURNS), "transcription": maybe(TRANSCRIPTION)}
)
SESSION = st.fixed_dictionaries(
    {},
    optional={
        "type": maybe(st.just("transcription")),
        "audio": maybe(st.fixed_dictionaries({}, optional={"input": maybe(AUDIO_INPUT)})),
        "include": JSON,
    },
)
BETA = st.fixed_dictionaries(
    {},
    optional={
        "input_audio_format": maybe(st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw"])),
        "input_audio_transcription": maybe(TRANSCRIPTION),
        "turn_detection": maybe(TURNS),
    },
)
AUDIO = st.binary(max_size=4000).map(lambda b: base64.b64encode(b).decode()) | JSON
EVENT = st.one_of(
    st.builds(lambda s: {"type": "session.update", "session": s}, maybe(SESSION)),
    st.builds(lambda s: {"type": "transcription_session.update", "session": s}, maybe(BETA)),
    st.builds(lambda a: {"type": "input_audio_buffer.append", "audio": a}, AUDIO),
    st.sampled_from([{"type": "input_audio_buffer.commit"}, {"type": "input_audio_buffer.clear"}]),
    st.builds(lambda t: {"type": t}, st.text(max_size=20)),
    JSON,
)


@settings(
    max_examples=int(os.environ.get("ASR_FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=list(HealthCheck)
)
@given(script=st.lists(EVENT, min_size=1, max_size=12))
def test_fuzzed_events_never_break_a_session(server: str, script: list[Any]) -> None:
    async def main() -> None:
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            await ws.recv()
            for ev in script:
                await ws.send(json.dumps(ev))
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            while True:  # everything answered, then the clear: the session is alive
                got = json.loads(await asyncio.wait_for(ws.recv(), 20))
                assert not (got["type"] == "error" and got["error"]["code"] == "server_error"), got
                if got["type"] == "input_audio_buffer.cleared":
                    break

    asyncio.run(main())
