"""Graceful shutdown behind a load balancer: lose no request and no live stream's last words.

On SIGTERM (a rolling restart, a scale-down, ``docker stop``) the server goes through four steps
before uvicorn's own shutdown:

1. **Not ready, still serving** for ``ASR_DRAIN_DELAY_S``: ``/health/ready`` answers 503
   ("draining") while every request and new session is still served as usual, so a load
   balancer's health checks take the replica out before it stops accepting. HAProxy as
   ``deploy/compose`` sets it up (``inter 1s fall 2``) needs about 2 s, so the Compose file gives
   5; Kubernetes stops routing on its own (its ``preStop`` pause does this job there, so the
   delay stays 0).
2. **Stop accepting**: the HTTP (and Wyoming) listeners close; idle keep-alive connections are
   closed and busy ones end after their response. A late connection is refused, which a proxy
   retries on another replica (nothing was sent yet).
3. **Let work end on its own**: in-flight requests finish, live sessions run to their natural end
   (a client's commit, a Wyoming ``audio-stop``).
4. **Finish the rest**: ``FINISH_S`` before ``ASR_SHUTDOWN_TIMEOUT_S`` runs out, every live
   session still open ends its turn in progress (the client receives that turn's final transcript)
   and is then closed with 1012 "service restart", the close code that tells a client to reconnect.

What is still running at the deadline is cut by uvicorn (``timeout_graceful_shutdown``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.routes.deps import ServiceState

log = logging.getLogger("service")

FINISH_S = 5.0  # at most this much of the shutdown timeout is kept for the last turns' final transcripts
HTTP_PROTOCOLS = (H11Protocol, HttpToolsProtocol)  # ASR_HTTP picks one; WebSocket protocols are left alone


async def drain(server: uvicorn.Server, state: ServiceState, sockets: list[socket.socket] | None) -> None:
    """Steps 1-4 above; returns with the remaining time set as uvicorn's graceful timeout."""
    settings = state.settings
    loop = asyncio.get_running_loop()
    state.draining = True
    if settings.drain_delay_s > 0:
        log.info("draining: not ready, still serving for %.1f s (ASR_DRAIN_DELAY_S)", settings.drain_delay_s)
        await _wait_for(lambda: server.force_exit, loop.time() + settings.drain_delay_s)
    deadline = loop.time() + settings.shutdown_timeout_s
    for listener in server.servers:
        listener.close()
    for sock in sockets or []:
        sock.close()
    if state.wyoming is not None:
        state.wyoming.stop_listening()
    for conn in list(server.server_state.connections):
        if isinstance(conn, HTTP_PROTOCOLS):
            conn.shutdown()  # idle: closed now; busy: closed after its response (uvicorn's own rule)

    def idle() -> bool:
        return server.force_exit or (not server.server_state.tasks and state.live.active == 0)

    finish_at = deadline - min(FINISH_S, settings.shutdown_timeout_s / 3)
    log.info(
        "draining: %d requests/sessions in flight, %d live sessions", len(server.server_state.tasks), state.live.active
    )
    if not await _wait_for(idle, finish_at) and state.live.active:
        log.info("draining: ending %d live sessions (final transcript, then close 1012)", state.live.active)
        state.live.finish_all()
        await _wait_for(idle, deadline)
    # uvicorn's shutdown: what remains (idle connections, open WebSockets) is closed, and tasks
    # still running get the time left before they are cancelled.
    server.config.timeout_graceful_shutdown = max(0, round(deadline - loop.time()))


async def _wait_for(condition: Callable[[], bool], until: float, step_s: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or the loop's clock reaches ``until`` (False)."""
    loop = asyncio.get_running_loop()
    while not condition():
        if loop.time() >= until:
            return False
        await asyncio.sleep(min(step_s, max(0.0, until - loop.time())))
    return True
