"""Start the real service (``python -m service``, as users start it) on a free port for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Each server's output goes to a file, not a pipe: a pipe nobody reads until the end fills at
# 64 KB, and then the server blocks on its next log line (its event loop with it).
_OUTPUT: weakref.WeakKeyDictionary[subprocess.Popen[str], IO[str]] = weakref.WeakKeyDictionary()


def start_service(port: int, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m service`` on 127.0.0.1:``port`` with ``env`` (ASR_* settings)."""
    full_env = {**os.environ, "ASR_LOG_LEVEL": "warning", **(env or {})}
    out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process: _OUTPUT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _OUTPUT[proc] = out
    return proc


def output_of(proc: subprocess.Popen[str]) -> str:
    """Everything ``proc`` (started by ``start_service``) has printed so far."""
    out = _OUTPUT[proc]
    out.flush()
    out.seek(0)
    return out.read()


def wait_until_ready(
    url: str, proc: subprocess.Popen[str], timeout_s: float = 60.0, loading_will_do: bool = False, api_key: str = ""
) -> None:
    """Until ``/health`` says ready (or, ``loading_will_do``, answers at all); raises if ``proc`` exits."""
    probe = {"Authorization": f"Bearer {api_key}"} if api_key else None  # ASR_AUTH_ALL_ENDPOINTS
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output_of(proc)}")
        try:
            r = httpx.get(f"{url}/health", timeout=2, headers=probe)
            if r.status_code == 200 or (loading_will_do and r.status_code == 503):
                return
            if r.status_code == 503 and r.json().get("status") == "failed":
                return  # a broken model: the caller checks the reason
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not ready after {timeout_s} s")
        time.sleep(0.1)


def stop_service(proc: subprocess.Popen[str], timeout_s: float = 15.0) -> str:
    """SIGTERM, then SIGKILL after ``timeout_s``; the process's output."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return output_of(proc)


@contextmanager
def running_server(
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout_s: float = 60.0,
    output: list[str] | None = None,
    process: list[subprocess.Popen[str]] | None = None,
) -> Iterator[str]:
    """Run ``python -m service`` with ``env`` (ASR_* settings); yield its base URL.

    When ``output`` is given, the server's stdout+stderr is appended to it after it stops;
    ``process`` receives the server's ``Popen`` (to signal it).
    """
    port = free_port()
    proc = start_service(port, env)
    if process is not None:
        process.append(proc)
    url = f"http://127.0.0.1:{port}"
    keys = {**os.environ, **(env or {})}.get("ASR_API_KEYS", "").split(",")
    try:
        wait_until_ready(url, proc, timeout_s, not wait_ready, keys[0].strip())
        yield url
    finally:
        out = stop_service(proc)
        if output is not None:
            output.append(out)
