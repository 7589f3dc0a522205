"""Start the real service (``python -m service``, as users start it) on a free port for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    full_env = {**os.environ, "ASR_LOG_LEVEL": "warning", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if process is not None:
        process.append(proc)
    url = f"http://127.0.0.1:{port}"
    keys = full_env.get("ASR_API_KEYS", "").split(",")
    probe = {"Authorization": f"Bearer {keys[0].strip()}"} if keys[0].strip() else None  # ASR_AUTH_ALL_ENDPOINTS
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                r = httpx.get(f"{url}/health", timeout=2, headers=probe)
                if r.status_code == 200 or (not wait_ready and r.status_code == 503):
                    break
                if r.status_code == 503 and r.json().get("status") == "failed":
                    break  # a broken model: the caller checks the reason
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
        if output is not None:
            output.append(out or "")
