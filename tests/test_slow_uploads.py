"""Slow uploads cannot take the server: tricklers get 408, and requests whose audio is here go on.

Clients are raw sockets against the real server: each sends a transcription request's headers
(a Content-Length it never reaches) and then body bytes slowly or not at all, as a slowloris
client does. Uploads still arriving hold upload slots, not queue slots (``service.middleware
.Admission``), so a normal request gets its answer while they trickle; each trickler is cut
off with 408 ``upload_too_slow`` once it stalls past ``ASR_UPLOAD_IDLE_TIMEOUT_S`` or falls below
``ASR_UPLOAD_MIN_RATE_KBPS`` after ``ASR_UPLOAD_GRACE_S``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from testkit.server import running_server
from tests.conftest import speech_files

BOUNDARY = "tricklebound"


def open_trickler(url: str, length: int = 200_000) -> socket.socket:
    """A socket that has sent a transcription request's headers and the start of its body."""
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=60)
    head = (
        f"POST /transcribe HTTP/1.1\r\nHost: {u.hostname}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
    )
    s.sendall(head.encode())
    return s


def status_of(s: socket.socket) -> tuple[int | None, bytes]:
    """The HTTP status the server answered on ``s`` (None: closed without an answer)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        data += s.recv(4096) if b"\r\n\r\n" in data else b""
    except OSError:
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, data
    return int(data[9:12]), data


@pytest.fixture(scope="module")
def wav(speech_dir: Path) -> bytes:
    return speech_files(speech_dir)[0].read_bytes()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The defaults: 64 queue slots (70 tricklers would take them all were they queued), 128 upload slots."""
    with running_server({}) as url:
        yield url


def test_seventy_tricklers_neither_block_others_nor_stay(server: str, wav: bytes) -> None:
    """The issue's case with the default timeouts: 70 clients send their headers and then stall."""
    socks = [open_trickler(server) for _ in range(70)]
    t0 = time.monotonic()
    try:
        time.sleep(0.5)  # all connected and reading
        stats = httpx.get(f"{server}/stats").json()["admission"]
        assert stats["uploading"] == 70 and stats["in_progress"] == 0
        t = time.perf_counter()
        r = httpx.post(f"{server}/transcribe", files={"file": ("a.wav", wav)}, timeout=30)
        took = time.perf_counter() - t
        assert r.status_code == 200 and r.json()["text"], r.text
        assert took < 2.0, f"a normal request waited {took:.1f} s behind the tricklers"
        results: list[tuple[int | None, float]] = []
        lock = threading.Lock()

        def wait(s: socket.socket) -> None:
            code, _ = status_of(s)
            with lock:
                results.append((code, time.monotonic() - t0))

        threads = [threading.Thread(target=wait, args=(s,)) for s in socks]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        codes = [c for c, _ in results]
        assert codes == [408] * 70, codes
        worst = max(t for _, t in results)
        assert worst < 30, f"a trickler stayed {worst:.1f} s"  # ASR_UPLOAD_IDLE_TIMEOUT_S is 10 s
    finally:
        for s in socks:
            s.close()
    after = httpx.get(f"{server}/stats").json()
    assert after["admission"]["uploading"] == 0 and after["admission"]["in_progress"] == 0
    model = next(iter(after["models"].values()))
    assert model["requests"]["client_error"]["upload_too_slow"] >= 70


def test_a_client_below_the_minimum_rate_is_cut_off(wav: bytes) -> None:
    """Bytes keep coming (no gap over the idle timeout), but too slowly: cut after the grace period."""
    env = {
        "ASR_UPLOAD_IDLE_TIMEOUT_S": "5",
        "ASR_UPLOAD_GRACE_S": "2",
        "ASR_UPLOAD_MIN_RATE_KBPS": "1",
        "ASR_UPLOADS_MAX": "3",
    }
    with running_server(env) as url:
        s = open_trickler(url)
        t0 = time.monotonic()
        stop = threading.Event()

        def drip() -> None:
            while not stop.is_set():
                try:
                    s.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.3)

        th = threading.Thread(target=drip)
        th.start()
        try:
            code, data = status_of(s)
            took = time.monotonic() - t0
        finally:
            stop.set()
            th.join()
            s.close()
        assert code == 408 and b"upload_too_slow" in data, data
        assert 1.5 < took < 4.5, took
        # A fast upload is untouched by the same limits.
        r = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", wav)}, timeout=30)
        assert r.status_code == 200
        # Upload slots are bounded too: past ASR_UPLOADS_MAX, arrivals are refused at once.
        socks = [open_trickler(url) for _ in range(3)]
        try:
            time.sleep(0.3)
            t = time.perf_counter()
            r = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", wav)}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
            assert time.perf_counter() - t < 1.0
        finally:
            for x in socks:
                x.close()


def test_both_http_stacks_serve(wav: bytes) -> None:
    """ASR_HTTP / ASR_LOOP: uvicorn's pure-Python stack still serves (the C fast paths are the default)."""
    with running_server({"ASR_HTTP": "h11", "ASR_LOOP": "asyncio"}) as url:
        r = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", wav)}, timeout=30)
        assert r.status_code == 200 and r.json()["text"]
