"""Graceful shutdown on the real server (``service.drain``): what a load balancer and a live
client see between SIGTERM and exit.

A replica restarted under load must lose nothing: during ``ASR_DRAIN_DELAY_S`` it is not ready
but still serves; then it refuses new connections (which a proxy retries elsewhere); a live
session runs to its natural end, or, when the shutdown timeout is near, gets its turn's final
transcript and then 1012 ("service restart", reconnect).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import time
from typing import Any

import httpx
import numpy as np
import websockets

from testkit.rolling import SESSION_16K, pcm16
from testkit.server import running_server
from tests.test_live_realtime import offline, ws_url


def append(x: np.ndarray) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(x)).decode()})


async def send_paced(ws: Any, x: np.ndarray, chunk_s: float = 0.1, pace: float = 4.0) -> None:
    """Send ``x`` in ``chunk_s`` appends at ``pace`` x real time, like a (fast) microphone."""
    step = int(16000 * chunk_s)
    for i in range(0, len(x), step):
        await ws.send(append(x[i : i + step]))
        await asyncio.sleep(chunk_s / pace)


async def events_until_close(ws: Any, timeout_s: float = 30) -> tuple[list[dict[str, Any]], int | None]:
    events: list[dict[str, Any]] = []
    try:
        while True:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout_s)))
    except websockets.ConnectionClosed as e:
        return events, e.rcvd.code if e.rcvd else None


def completed(events: list[dict[str, Any]]) -> list[str]:
    return [e["transcript"] for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]


def test_not_ready_but_serving_during_the_drain_delay(sentences: list) -> None:
    x, _ = sentences[0]
    procs: list[subprocess.Popen[str]] = []
    with running_server({"ASR_DRAIN_DELAY_S": "4"}, process=procs) as url:
        before = offline(url, x)
        procs[0].send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        ready = httpx.get(f"{url}/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert offline(url, x) == before  # still served, as before
        assert time.monotonic() - t0 < 4, "the checks above took longer than the delay: they proved nothing"
        while True:  # then it stops accepting
            try:
                httpx.get(f"{url}/health/live", timeout=2)
            except httpx.TransportError:
                break
            time.sleep(0.05)
        assert time.monotonic() - t0 >= 3.9
        assert procs[0].wait(15) in (0, -signal.SIGTERM)


def test_live_session_runs_to_its_end_during_the_drain(sentences: list) -> None:
    x, _ = sentences[1]
    half = len(x) // 2
    procs: list[subprocess.Popen[str]] = []
    with running_server({"ASR_SHUTDOWN_TIMEOUT_S": "30"}, process=procs) as url:
        expected = offline(url, x).strip()

        async def main() -> tuple[list[dict[str, Any]], int | None, bool]:
            async with websockets.connect(ws_url(url)) as ws:
                await ws.send(json.dumps(SESSION_16K))
                await send_paced(ws, x[:half])
                procs[0].send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                refused = False
                try:  # the listener is closed: a new client goes elsewhere
                    async with websockets.connect(ws_url(url), open_timeout=3):
                        pass
                except OSError:
                    refused = True
                await send_paced(ws, x[half:])  # the session in progress goes on
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                events: list[dict[str, Any]] = []
                while not completed(events):
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
            return events, ws.close_code, refused

        events, code, refused = asyncio.run(main())
        assert refused
        assert completed(events) == [expected] and code == 1000
        assert not [e for e in events if e["type"] == "error"]
        assert procs[0].wait(10) in (0, -signal.SIGTERM)  # the last session gone, the server exits


def test_live_session_past_the_timeout_gets_its_final_transcript_then_1012(sentences: list) -> None:
    x, _ = sentences[2]
    part = x[: len(x) * 2 // 3]
    procs: list[subprocess.Popen[str]] = []
    # 3 s to drain: sessions still open after 2 s are finished (service.drain.FINISH_S, capped at a third).
    with running_server({"ASR_SHUTDOWN_TIMEOUT_S": "3"}, process=procs) as url:
        expected = offline(url, part).strip()

        async def main() -> tuple[list[dict[str, Any]], int | None, float]:
            async with websockets.connect(ws_url(url)) as ws:
                await ws.send(json.dumps(SESSION_16K))
                await send_paced(ws, part)
                procs[0].send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                events, code = await events_until_close(ws)  # the client says nothing more
                return events, code, time.monotonic() - t0

        events, code, waited = asyncio.run(main())
        assert code == 1012
        assert completed(events) == [expected]
        types = [e["type"] for e in events]
        assert types.index("input_audio_buffer.committed") < types.index("error")
        assert events[-1]["error"]["code"] == "server_restarting"
        assert 1.5 < waited < 3.5
        assert procs[0].wait(10) in (0, -signal.SIGTERM)
