"""Load that counts what a rolling restart loses: HTTP transcriptions and live sessions.

Used by ``tests/test_scale_out.py`` (HAProxy and service processes on this machine) and
``bench/rolling_restart.py`` (the Compose set-up on Docker). Clients talk to the load balancer
only. Every HTTP answer must be 200 with the clip's transcript; every live session streams a clip
at real-time pace, commits, and must receive that turn's final transcript. A session a draining
replica ends early (1012, after the final transcript of what it heard) counts as ``ended_early``:
nothing was lost, but the client had to reconnect.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import soundfile as sf
import websockets

COMPLETED = "conversation.item.input_audio_transcription.completed"
SESSION_16K = {
    "type": "session.update",
    "session": {"type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}},
}  # fmt: skip


@dataclass
class Tally:
    http_ok: int = 0
    http_failed: int = 0
    streams_ok: int = 0
    streams_ended_early: int = 0  # final transcript of the audio sent so far, then 1012
    streams_lost: int = 0  # no final transcript for audio the client sent
    streams_open_at_restart: list[int] = field(default_factory=list)  # live sessions when each restart began
    failures: list[str] = field(default_factory=list)  # what went wrong, one line each (first 50)
    open_streams: int = 0

    def fail(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {what}")

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "open_streams"}


class HAProxyStats:
    """The load balancer's view of the replicas, from its stats page (CSV)."""

    def __init__(self, url: str, backend: str = "asr"):
        self.url, self.backend = url.rstrip("/") + "/;csv", backend

    def servers(self) -> dict[str, dict[str, str]]:
        rows = csv.DictReader(io.StringIO(httpx.get(self.url, timeout=5).text.lstrip("# ")))
        return {
            r["svname"]: r for r in rows if r["pxname"] == self.backend and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def up(self) -> list[str]:
        return sorted(n for n, s in self.servers().items() if s["status"] == "UP")

    def wait(self, ok: Callable[[list[str]], bool], timeout_s: float = 120.0) -> list[str]:
        """Until ``ok(names of the servers up)``; those names."""
        deadline = time.monotonic() + timeout_s
        up: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                up = self.up()
                if ok(up):
                    return up
            time.sleep(0.2)
        raise TimeoutError(f"HAProxy: servers up {up}, waited {timeout_s} s")


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def wav_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def reference_texts(url: str, clips: list[np.ndarray]) -> list[str]:
    """Each clip's transcript through the load balancer before anything restarts."""
    async with httpx.AsyncClient(timeout=120) as c:
        out = []
        for x in clips:
            r = await c.post(f"{url}/transcribe", files={"file": ("a.wav", wav_bytes(x))})
            r.raise_for_status()
            out.append(str(r.json()["text"]).strip())
    return out


async def http_client(url: str, clips: list[bytes], expected: list[str], stop: asyncio.Event, t: Tally) -> None:
    """POST clips back to back on one keep-alive connection, as a batch client does."""
    i = 0
    async with httpx.AsyncClient(timeout=120) as c:
        while not stop.is_set():
            k = i % len(clips)
            i += 1
            try:
                r = await c.post(f"{url}/transcribe", files={"file": ("a.wav", clips[k])})
            except httpx.HTTPError as e:
                t.http_failed += 1
                t.fail(f"http: {type(e).__name__}: {e}")
                continue
            if r.status_code != 200:
                t.http_failed += 1
                t.fail(f"http: {r.status_code} {r.text[:200]}")
            elif str(r.json()["text"]).strip() != expected[k]:
                t.http_failed += 1
                t.fail(f"http: wrong transcript {r.json()['text']!r}, expected {expected[k]!r}")
            else:
                t.http_ok += 1


async def stream_client(
    ws_url: str, clips: list[np.ndarray], expected: list[str], stop: asyncio.Event, t: Tally, chunk_s: float = 0.1
) -> None:
    """Live sessions one after another: a clip at real-time pace, commit, wait for its final text."""
    i = 0
    while not stop.is_set():
        k = i % len(clips)
        i += 1
        x = clips[k]
        got: list[str] = []
        sent_all = False
        try:
            async with websockets.connect(ws_url, open_timeout=10, close_timeout=5) as ws:
                t.open_streams += 1
                try:
                    await ws.send(json.dumps(SESSION_16K))
                    step = int(16000 * chunk_s)
                    for j in range(0, len(x), step):
                        audio = base64.b64encode(pcm16(x[j : j + step])).decode()
                        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                        await asyncio.sleep(chunk_s)
                    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                    sent_all = True
                    while not got:
                        ev = json.loads(await asyncio.wait_for(ws.recv(), 60))
                        if ev["type"] == COMPLETED:
                            got.append(str(ev["transcript"]).strip())
                        elif ev["type"] == "error":
                            t.fail(f"stream: error event {ev['error']}")
                finally:
                    t.open_streams -= 1
        except websockets.ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
            if got or code != 1012:
                t.streams_lost += 1
                t.fail(f"stream: closed {code} before its final transcript (sent all: {sent_all})")
            else:
                t.streams_ended_early += 1  # 1012 after the final transcript of what was sent
            continue
        except (OSError, TimeoutError, websockets.WebSocketException) as e:
            t.streams_lost += 1
            t.fail(f"stream: {type(e).__name__}: {e}")
            continue
        if got == [expected[k]]:
            t.streams_ok += 1
        else:
            t.streams_lost += 1
            t.fail(f"stream: final transcript {got!r}, expected {expected[k]!r}")


async def run_under_load(
    url: str,
    clips: list[np.ndarray],
    restarts: list[Callable[[], Awaitable[None]]],
    http_clients: int = 2,
    streams: int = 2,
    warmup_s: float = 3.0,
    cooldown_s: float = 3.0,
) -> Tally:
    """Start the clients, run each restart in turn under their load, stop them, return the tally.

    Clients finish what they started once told to stop, so nothing is cut by the test itself.
    """
    expected = await reference_texts(url, clips)
    wavs = [wav_bytes(x) for x in clips]
    ws_url = url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    t, stop = Tally(), asyncio.Event()
    tasks = [asyncio.create_task(http_client(url, wavs, expected, stop, t)) for _ in range(http_clients)]
    tasks += [asyncio.create_task(stream_client(ws_url, clips, expected, stop, t)) for _ in range(streams)]
    await asyncio.sleep(warmup_s)
    for restart in restarts:
        t.streams_open_at_restart.append(t.open_streams)
        await restart()
    await asyncio.sleep(cooldown_s)
    stop.set()
    await asyncio.gather(*tasks)
    return t
