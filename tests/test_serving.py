"""Serving many users: micro-batching, admission, deadlines, disconnects, body limit, shutdown, access.

Every test runs the real server (``python -m service``) and talks to it over real sockets.
Timing-dependent set-ups use generous margins (a queue delay of seconds against requests that
need milliseconds), so a slow shared machine changes how long a test takes, not its outcome.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from service.audio import read_audio
from service.config import Settings
from service.models import ModelPackage, Recognizer
from service.scheduler import Scheduler
from testkit.server import running_server
from tests.conftest import NemoModel, speech_files
from tests.test_api import DEFAULT_MODEL, assert_error, default_env, model_env, post

KEY = "test-key-1"


def model_stats(url: str, name: str, headers: dict[str, str] | None = None) -> dict:
    return httpx.get(f"{url}/stats", headers=headers).json()["models"][name]


@pytest.fixture(scope="module")
def clips(speech_dir: Path) -> list[Path]:
    return speech_files(speech_dir)


@pytest.fixture(scope="module")
def expected(clips: list[Path]) -> list[str]:
    """The default model's transcripts of ``clips``, in process: what the server must answer."""
    s = Settings()
    rec = Recognizer(ModelPackage.open(s.model_dir, s.tokens_dir, DEFAULT_MODEL))
    return [rec.transcribe([read_audio(p, rec.sample_rate)[0]])[0].text for p in clips]


def wait_for(cond, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


# --- batching ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server(conformer: NemoModel) -> Iterator[str]:
    env = model_env(conformer, ASR_MAX_BATCH_SIZE="8", ASR_MAX_QUEUE_DELAY_MS="500")
    with running_server(env) as url:
        yield url


def test_concurrent_requests_are_batched_and_each_gets_its_own_nemo_transcript(
    batching_server: str, conformer: NemoModel
) -> None:
    """22 clips of unequal lengths sent at once: batched (mean size > 1), each answer still NeMo's."""
    before = model_stats(batching_server, conformer.name)
    with ThreadPoolExecutor(len(conformer.files)) as ex:
        rs = list(ex.map(lambda p: post(batching_server, p.read_bytes(), p.name), conformer.files))
    for r, path, expected in zip(rs, conformer.files, conformer.transcripts, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["text"] == expected, path.name
    after = model_stats(batching_server, conformer.name)
    batches = after["batches"] - before["batches"]
    assert after["requests"]["ok"] - before["requests"].get("ok", 0) == len(conformer.files)
    assert batches < len(conformer.files), "no two requests shared a batch"
    assert after["queue"]["max_depth"] > 1 and after["queue"]["depth"] == 0


def test_batches_group_similar_lengths(clips: list[Path]) -> None:
    """The oldest job goes first, with the queued jobs nearest its length; far lengths wait."""
    pkg = ModelPackage.open(Settings().model_dir, Settings().tokens_dir, DEFAULT_MODEL)
    sched = Scheduler(Recognizer(pkg), ThreadPoolExecutor(1), max_batch_size=3, max_queue_delay_ms=0)
    from service.scheduler import Job

    def job(seconds: float) -> Job:
        return Job(np.zeros(int(seconds * 16000), np.float32), None, None, 0.0, math.inf)  # type: ignore[arg-type]

    lengths = [2.0, 10.0, 2.2, 9.0, 1.9, 2.1, 30.0]
    sched._queue = [job(s) for s in lengths]
    taken = []
    while sched._queue:
        taken.append(sorted(round(j.n / 16000, 1) for j in sched._take_batch()))
    assert taken == [[1.9, 2.0, 2.1], [9.0, 10.0], [2.2], [30.0]]


# --- admission, deadlines, disconnects, body limit, keys, CORS ----------------------------


@pytest.fixture(scope="module")
def busy_server(clips: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose queue holds jobs for 3 s (waiting for company), 3 admission slots, API keys."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("# one key per line\nfile-key\n\n")
    env = default_env(
        ASR_MAX_BATCH_SIZE="8",
        ASR_MAX_QUEUE_DELAY_MS="3000",
        ASR_QUEUE_SIZE="3",
        ASR_MAX_UPLOAD_MB="1",
        ASR_API_KEYS=f"{KEY}, other-key",
        ASR_API_KEYS_FILE=str(keys_file),
        ASR_CORS_ORIGINS="https://app.example",
    )
    with running_server(env) as url:
        yield url


AUTH = {"Authorization": f"Bearer {KEY}"}


def post_auth(url: str, data: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/transcribe", files={"file": ("a.wav", data)}, headers={**AUTH, **(headers or {})}, timeout=60
    )


def test_api_keys(busy_server: str, clips: list[Path], expected: list[str]) -> None:
    wav = clips[0].read_bytes()
    r = httpx.post(f"{busy_server}/transcribe", files={"file": ("a.wav", wav)})
    assert_error(r, 401, "missing_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(
        f"{busy_server}/transcribe", files={"file": ("a.wav", wav)}, headers={"Authorization": "Bearer nope"}
    )
    assert_error(r, 403, "invalid_api_key")
    assert_error(httpx.get(f"{busy_server}/stats"), 401, "missing_api_key")
    for key in (KEY, "other-key", "file-key"):  # from ASR_API_KEYS and from ASR_API_KEYS_FILE
        r = httpx.post(
            f"{busy_server}/transcribe", files={"file": ("a.wav", wav)}, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200 and r.json()["text"] == expected[0], key
    # Probes and scrapes stay open by default.
    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/"):
        assert httpx.get(f"{busy_server}{path}").status_code == 200, path


def test_auth_all_endpoints_closes_probes(clips: list[Path]) -> None:
    env = default_env(ASR_API_KEYS=KEY, ASR_AUTH_ALL_ENDPOINTS="true")
    with running_server(env, wait_ready=False) as url:
        assert_error(httpx.get(f"{url}/metrics"), 401, "missing_api_key")
        assert_error(httpx.get(f"{url}/health/live"), 401, "missing_api_key")
        assert httpx.get(f"{url}/health/live", headers=AUTH).status_code == 200


def test_cors(busy_server: str, clips: list[Path]) -> None:
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{busy_server}/transcribe", headers={**pre, "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(f"{busy_server}/transcribe", headers={**pre, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # An error answer (401) also carries CORS headers, so a browser app can read the reason.
    r = httpx.get(f"{busy_server}/stats", headers={"Origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_closed_by_default(batching_server: str) -> None:
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{batching_server}/transcribe", headers=pre)
    assert "access-control-allow-origin" not in r.headers


def test_full_queue_is_refused_fast_with_retry_after(busy_server: str, clips: list[Path], expected: list[str]) -> None:
    wav = clips[1].read_bytes()
    with ThreadPoolExecutor(3) as ex:
        held = [ex.submit(post_auth, busy_server, wav) for _ in range(3)]  # 3 slots, held ~3 s
        wait_for(lambda: model_stats(busy_server, DEFAULT_MODEL, AUTH)["queue"]["in_progress"] == 3)
        t0 = time.perf_counter()
        r = post_auth(busy_server, wav)
        refused_s = time.perf_counter() - t0
        assert_error(r, 503, "queue_full")
        assert int(r.headers["retry-after"]) >= 1
        assert refused_s < 2.5, "refusal waited for the queue"  # (the held requests take >= 3 s)
        results = [f.result() for f in held]
    assert all(x.status_code == 200 and x.json()["text"] == expected[1] for x in results)
    s = model_stats(busy_server, DEFAULT_MODEL, AUTH)
    assert s["requests"]["unavailable"]["queue_full"] >= 1 and s["queue"]["in_progress"] == 0


def test_deadline_drops_queued_request_with_504(busy_server: str, clips: list[Path]) -> None:
    before = model_stats(busy_server, DEFAULT_MODEL, AUTH)
    r = post_auth(busy_server, clips[0].read_bytes(), {"X-Request-Timeout": "0.5"})
    assert_error(r, 504, "deadline_exceeded")
    after = model_stats(busy_server, DEFAULT_MODEL, AUTH)
    assert (
        after["requests"]["timeout"]["deadline_exceeded"]
        == before["requests"].get("timeout", {}).get("deadline_exceeded", 0) + 1
    )
    assert after["batches"] == before["batches"]  # dropped before compute
    for bad in ("0", "-1", "soon", "1e9", "nan"):
        assert_error(post_auth(busy_server, b"x", {"X-Request-Timeout": bad}), 400, "invalid_timeout")


def raw_request(url: str, head: str, body: bytes) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(head.encode() + body)
    return s


def read_answer(s: socket.socket, answer: bytes) -> bytes:
    """Read an HTTP response with a JSON body to its end (or until the server closes)."""
    s.settimeout(10)
    while not answer.endswith(b"}"):
        more = s.recv(65536)
        if not more:
            break
        answer += more
    return answer


def multipart(data: bytes) -> tuple[str, bytes]:
    b = "testboundary123"
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{b}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={b}", body


def test_client_disconnect_cancels_queued_work(busy_server: str, clips: list[Path]) -> None:
    before = model_stats(busy_server, DEFAULT_MODEL, AUTH)
    ctype, body = multipart(clips[0].read_bytes())
    head = (
        f"POST /transcribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    s = raw_request(busy_server, head, body)
    wait_for(lambda: model_stats(busy_server, DEFAULT_MODEL, AUTH)["queue"]["depth"] == 1)
    s.close()  # gone while its job waits (3 s) for company
    wait_for(lambda: model_stats(busy_server, DEFAULT_MODEL, AUTH)["queue"]["in_progress"] == 0, 2.5)
    after = model_stats(busy_server, DEFAULT_MODEL, AUTH)
    assert after["queue"]["depth"] == 0
    assert (
        after["requests"]["client_gone"]["client_disconnected"]
        == before["requests"].get("client_gone", {}).get("client_disconnected", 0) + 1
    )
    time.sleep(3.2)  # past the queue delay: had the job stayed queued, a batch would have run by now
    assert model_stats(busy_server, DEFAULT_MODEL, AUTH)["batches"] == before["batches"]


def test_chunked_upload_is_cut_off_at_the_limit(busy_server: str) -> None:
    """No Content-Length: the 1 MB limit is enforced while the body streams in, 413 long before the end."""
    head = (
        f"POST /transcribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=zz\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    s = raw_request(busy_server, head, b"")
    s.settimeout(0.05)
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"\0" * 64 * 1024)
    sent, answer = 0, b""
    try:
        part = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        while sent < 200 * 2**20 and not answer:  # would be 200 MB
            try:
                s.sendall(chunk)
                sent += 64 * 1024
            except (BrokenPipeError, ConnectionResetError):
                break
            with contextlib.suppress(TimeoutError):
                answer = s.recv(65536)
        answer = read_answer(s, answer)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 8 * 2**20, f"server read {sent / 2**20:.1f} MB before refusing a 1 MB limit"
    assert b'"code":"file_too_large"' in answer


def test_declared_oversize_body_refused_before_reading(busy_server: str) -> None:
    head = (
        f"POST /transcribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 2000000000\r\n\r\n"
    )
    s = raw_request(busy_server, head, b"")
    try:
        answer = read_answer(s, b"")
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"file_too_large"' in answer


# --- graceful shutdown --------------------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_then_exits(clips: list[Path], expected: list[str]) -> None:
    env = default_env(
        ASR_MAX_BATCH_SIZE="8",
        ASR_MAX_QUEUE_DELAY_MS="1500",
        ASR_LOG_LEVEL="info",
        ASR_SHUTDOWN_TIMEOUT_S="20",
    )
    logs: list[str] = []
    wav = clips[2].read_bytes()
    procs: list[subprocess.Popen[str]] = []
    with running_server(env, output=logs, process=procs) as url, ThreadPoolExecutor(3) as ex:
        proc = procs[0]
        inflight = [ex.submit(post, url, wav) for _ in range(3)]
        wait_for(lambda: httpx.get(f"{url}/stats").json()["models"][DEFAULT_MODEL]["queue"]["depth"] == 3)
        proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in inflight]
        # uvicorn re-raises the signal once shut down, so a SIGTERM'd server reports -15 (143 in a shell).
        assert proc.wait(timeout=25) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["text"] == expected[2] for r in results)
    lines = [json.loads(line) for line in logs[0].splitlines() if line.startswith("{")]
    msgs = [d["msg"] for d in lines]
    assert any("draining" in m for m in msgs) and "Application shutdown complete." in msgs


def test_draining_server_is_not_ready() -> None:
    """Between SIGTERM and exit, readiness says so (load balancers stop sending)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(Settings())
    with TestClient(app) as client:
        wait_for(lambda: client.get("/health").status_code == 200, 60)
        app.state.service.draining = True
        r = client.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert client.get("/health/live").status_code == 200
