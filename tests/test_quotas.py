"""Fair use: per-client quotas on requests, audio seconds and concurrency (``service/quotas.py``).

The bucket arithmetic is checked on a fake clock against values worked out by hand; the
middleware on the real server, with two API keys as two clients: the one past its quota gets
``429`` with ``Retry-After`` and a code naming the limit, while the other is served.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets

from service.errors import ClientError
from service.quotas import Quotas, client_key
from testkit.rolling import SESSION_16K, pcm16, wav_bytes
from testkit.server import running_server
from tests.conftest import speech_files


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def refused(q: Quotas, key: str) -> ClientError:
    with pytest.raises(ClientError) as e:
        q.admit(key)
    assert e.value.status == 429
    return e.value


def test_request_bucket_allows_a_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    q = Quotas(requests_per_min=3, clock=clock)
    for _ in range(3):
        q.admit("a")
        q.release("a", 0)
    e = refused(q, "a")
    assert e.code == "rate_limited" and e.headers == {"Retry-After": "20"}  # 60 s / 3 per token
    q.admit("b")  # another client is untouched
    clock.t += 19.9
    assert refused(q, "a").headers == {"Retry-After": "1"}
    clock.t += 0.1
    q.admit("a")  # one token back after 20 s
    assert refused(q, "a").code == "rate_limited"


def test_audio_bucket_charges_after_the_fact_and_waits_out_the_debt() -> None:
    clock = FakeClock()
    q = Quotas(audio_s_per_min=60, clock=clock)
    q.admit("a")
    q.release("a", 90.0)  # one request may overrun the minute: its length was not known before
    e = refused(q, "a")
    assert e.code == "audio_quota_exceeded" and e.headers == {"Retry-After": "30"}  # 30 s over at 1 s/s
    assert "30.0 s over" in e.message
    clock.t += 30.5
    q.admit("a")
    q.release("a", 0.0)


def test_concurrency_cap_counts_requests_in_flight() -> None:
    q = Quotas(concurrent=2, clock=FakeClock())
    q.admit("a")
    q.admit("a")
    assert refused(q, "a").code == "too_many_concurrent_requests"
    q.release("a", 0)
    q.admit("a")


def test_client_table_is_bounded_and_keeps_busy_clients() -> None:
    clock = FakeClock()
    q = Quotas(requests_per_min=10, max_clients=3, clock=clock)
    q.admit("busy")  # in flight: survives eviction though it is the least recently seen
    for i in range(100):
        q.admit(f"ip{i}")
        q.release(f"ip{i}", 0)
        clock.t += 1
    assert q.clients() == 3
    assert list(q._clients) == ["busy", "ip98", "ip99"]  # the oldest idle clients went
    q.release("busy", 0)


def test_client_identity_is_the_key_when_keys_are_used() -> None:
    scope = {"type": "http", "client": ("10.0.0.7", 5555), "headers": [(b"authorization", b"Bearer s3cret")]}
    assert client_key(scope, keyed=False) == "ip:10.0.0.7"
    k = client_key(scope, keyed=True)
    assert k.startswith("key:") and "s3cret" not in k
    assert client_key({**scope, "headers": []}, keyed=True) == "ip:10.0.0.7"


@pytest.fixture(scope="module")
def wav(speech_dir: Path) -> tuple[bytes, float]:
    f = speech_files(speech_dir)[0]
    return f.read_bytes(), sf.info(str(f)).duration


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    env = {
        "ASR_API_KEYS": "alice,bob",
        "ASR_QUOTA_REQUESTS_PER_MIN": "3",
        "ASR_QUOTA_CONCURRENT": "1",
    }
    with running_server(env) as url:
        yield url


def post(url: str, key: str, wav: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/transcribe", files={"file": ("a.wav", wav)}, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_client_past_its_request_quota_gets_429_and_others_are_served(server: str, wav: tuple[bytes, float]) -> None:
    for _ in range(3):
        assert post(server, "alice", wav[0]).status_code == 200
    r = post(server, "alice", wav[0])
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 20
    ok = post(server, "bob", wav[0])
    assert ok.status_code == 200 and ok.json()["text"]
    assert post(server, "nobody", wav[0]).status_code == 403  # a bad key is refused as such, never counted


def test_one_client_cannot_hold_two_slots(server: str, wav: tuple[bytes, float]) -> None:
    """ASR_QUOTA_CONCURRENT=1: while bob's slow upload is in progress, his second request gets 429."""
    body = wav[0]
    started = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        started.set()
        time.sleep(2.0)
        yield body[len(body) // 2 :]

    result: list[int] = []

    def first() -> None:
        boundary = "qb"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def stream() -> Iterator[bytes]:
            yield head
            yield from slow_body()
            yield tail

        r = httpx.post(
            f"{server}/transcribe",
            content=stream(),
            headers={
                "Authorization": "Bearer bob",
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + len(body) + len(tail)),
            },
            timeout=60,
        )
        result.append(r.status_code)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(10)
    time.sleep(0.3)
    r = post(server, "bob", body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_concurrent_requests", r.text
    t.join(30)
    assert result == [200]


def test_audio_quota_on_the_real_server(wav: tuple[bytes, float]) -> None:
    """ASR_QUOTA_AUDIO_S_PER_MIN: the clip is charged its length once served; in debt, 429 until paid back."""
    data, seconds = wav
    env = {"ASR_QUOTA_AUDIO_S_PER_MIN": f"{seconds * 1.5:.3f}"}  # room for one clip and a half
    with running_server(env) as url:
        r1 = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", data)}, timeout=60)
        r2 = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", data)}, timeout=60)
        r3 = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", data)}, timeout=60)
        batch = httpx.post(f"{url}/transcribe/batch", files=[("files", ("a.wav", data))], timeout=60)
    assert r1.status_code == 200 and r2.status_code == 200  # the second starts with half a clip left
    assert r3.status_code == 429 and r3.json()["error"]["code"] == "audio_quota_exceeded", r3.text
    assert int(r3.headers["Retry-After"]) >= 1
    assert batch.status_code == 429  # every transcription route shares the client's bucket


# -- live sessions draw on the same buckets ------------------------------------------------
def realtime_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"


async def until_closed(ws: Any) -> tuple[list[dict[str, Any]], int | None]:
    events: list[dict[str, Any]] = []
    try:
        while True:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
    except websockets.ConnectionClosed as e:
        return events, e.rcvd.code if e.rcvd else None


def test_a_live_session_holds_the_clients_concurrency_slot(wav: tuple[bytes, float]) -> None:
    """ASR_QUOTA_CONCURRENT=1 counts live sessions: carol's open session leaves her no second
    session and no request, while dave is served."""

    async def main(url: str) -> tuple[list[dict[str, Any]], int | None, int, int]:
        carol = {"Authorization": "Bearer carol"}
        async with websockets.connect(realtime_url(url), additional_headers=carol) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            async with websockets.connect(realtime_url(url), additional_headers=carol) as second:
                events, code = await until_closed(second)
            hers = await asyncio.to_thread(post, url, "carol", wav[0])
            his = await asyncio.to_thread(post, url, "dave", wav[0])
        return events, code, hers.status_code, his.status_code

    with running_server({"ASR_API_KEYS": "carol,dave", "ASR_QUOTA_CONCURRENT": "1"}) as url:
        events, code, hers, his = asyncio.run(main(url))
    assert code == 1013
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "too_many_concurrent_requests"
    assert hers == 429 and his == 200


def test_a_live_session_ends_when_its_audio_quota_runs_dry(sentences: list[tuple[np.ndarray, str]]) -> None:
    """ASR_QUOTA_AUDIO_S_PER_MIN: streamed audio is charged as it arrives; when the bucket is empty
    the turn in progress gets its final transcript, then the session closes (1013)."""
    x = np.concatenate([s for s, _ in sentences])  # longer than the quota
    quota = 3.0
    with running_server({"ASR_QUOTA_AUDIO_S_PER_MIN": str(quota)}) as url:

        async def main() -> tuple[list[dict[str, Any]], int | None, float]:
            sent = 0.0
            async with websockets.connect(realtime_url(url)) as ws:
                await ws.send(json.dumps(SESSION_16K))
                step = 1600
                try:
                    for i in range(0, len(x), step):
                        chunk = x[i : i + step]
                        audio = base64.b64encode(pcm16(chunk)).decode()
                        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                        sent += len(chunk) / 16000
                        await asyncio.sleep(0.02)
                except websockets.ConnectionClosed:
                    pass
                events, code = await until_closed(ws)
            return events, code, sent

        events, code, sent = asyncio.run(main())
        after = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", wav_bytes(x[:16000]))}, timeout=60)
    assert code == 1013
    finals = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(finals) == 1 and finals[0]["transcript"]  # what it had streamed, transcribed
    # cut at the chunk that emptied the bucket (plus what refilled while it streamed, 3 s/min)
    assert quota <= finals[0]["usage"]["seconds"] <= quota + 0.5
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "audio_quota_exceeded"
    assert sent < len(x) / 16000  # it was stopped before the end
    assert after.status_code == 429 and after.json()["error"]["code"] == "audio_quota_exceeded"
