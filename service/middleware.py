"""Raw ASGI middleware: what must act before a request body is read, and the request log.

Outermost first (``service.app`` adds them): CORS -> ``RequestLog`` -> ``ApiKeys`` ->
``Admission`` -> ``BodyLimit`` -> the routers. Raw ASGI rather than ``BaseHTTPMiddleware`` so
a refusal (no key, a full server, an oversized body) is answered without the body being read,
and streaming bodies pass through untouched. Routes leave fields for the log line in
``request.state.log_fields`` (the ASGI scope's ``state``), which ``RequestLog`` reads at the end.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ClientError, ServiceError, ServiceUnavailable
from service.http import error_response
from service.registry import AdmissionGate

access_log = logging.getLogger("service.access")
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file in a multipart body
OPEN_PATHS = ("/health", "/metrics")  # probes and scrapes: no API key unless ASR_AUTH_ALL_ENDPOINTS
# Never secret. (/live is the page; it asks for the key and sends it with what it calls.)
PUBLIC_PATHS = ("/", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect", "/live")
TRANSCRIBE_PATHS = ("/transcribe", "/transcribe/batch", "/v1/audio/transcriptions")


def set_log_fields(scope: Scope, **fields: Any) -> None:
    scope.setdefault("state", {})["log_fields"] = fields


async def refuse(err: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``err`` from a middleware, before the app (and the body) is reached."""
    set_log_fields(scope, error_code=err.code)
    await error_response(err)(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a request body past ``limit`` bytes with 413 while it streams in.

    A declared Content-Length over the limit is refused before any byte is read; a chunked body
    is counted as it arrives and cut off at the limit, so a 2 GB upload is never read (or spooled
    to disk) whole.
    """

    def __init__(self, app: ASGIApp, limit: int, on_reject: Callable[[], None]):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        seen, over, sent = 0, False, False

        async def counting_receive() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise BodyTooLarge
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal sent
            if over:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            sent = True
            await send(msg)

        with suppress(BodyTooLarge):  # usually the app turns it into an answer guarded_send drops
            await self.app(scope, counting_receive, guarded_send)
        if over and not sent:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.on_reject()
        mb = (self.limit - MULTIPART_OVERHEAD) / 1e6
        await refuse(
            ClientError(413, "file_too_large", f"request body exceeds the {mb:g} MB upload limit"), scope, receive, send
        )


class UploadStopped(Exception):
    """Raised into the app's body read when ``Admission`` ends an upload (it answers itself)."""


class Admission:
    """Admit a transcription in two stages, and keep its upload moving.

    1. On arrival, before any body byte is read: a server whose queue is full answers 503
       ``queue_full`` (with Retry-After) at once, so refusals stay fast when the cores are busy;
       otherwise the request takes an *upload* slot (``ASR_UPLOADS_MAX``; none left: 503 too).
    2. When its body has arrived whole, it trades that for a *queue* slot (``ASR_QUEUE_SIZE``),
       held until the answer is sent. Uploads still arriving, slow ones included, therefore never
       hold the slots of requests whose audio is here (measured: ``tests/test_slow_uploads.py``).

    An upload must keep coming, as nginx's ``client_body_timeout`` and Apache's ``mod_reqtimeout``
    require: no gap between body chunks longer than ``ASR_UPLOAD_IDLE_TIMEOUT_S``, and, once
    ``ASR_UPLOAD_GRACE_S`` has passed, at least ``ASR_UPLOAD_MIN_RATE_KBPS`` on average. Otherwise
    the client gets 408 ``upload_too_slow`` and the connection is closed.
    """

    def __init__(
        self,
        app: ASGIApp,
        gate: AdmissionGate,
        uploads: AdmissionGate,
        on_refuse: Callable[[str, int], None],
        idle_timeout_s: float = 10.0,
        min_rate_bps: float = 1000.0,
        grace_s: float = 10.0,
    ):
        self.app, self.gate, self.uploads, self.on_refuse = app, gate, uploads, on_refuse
        self.idle_timeout_s, self.min_rate_bps, self.grace_s = idle_timeout_s, min_rate_bps, grace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in TRANSCRIBE_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            self.gate.check()
            self.uploads.admit()
        except ServiceUnavailable as e:
            self.on_refuse(e.code, e.status)
            await refuse(e, scope, receive, send)
            return
        t0 = time.monotonic()
        seen = 0
        holding = "upload"  # which slot this request holds: "upload", "queue" or ""
        stopped: ServiceError | None = None
        sent = False

        def fail(err: ServiceError) -> UploadStopped:
            nonlocal stopped
            stopped = err
            return UploadStopped(err.code)

        async def paced_receive() -> Message:
            nonlocal seen, holding
            if stopped is not None:
                return {"type": "http.disconnect"}
            if holding != "upload":  # the body is in: later reads only wait for a disconnect
                return await receive()
            elapsed = time.monotonic() - t0
            wait = self.idle_timeout_s
            if self.min_rate_bps > 0:  # when the average rate would fall below the minimum
                wait = min(wait, max(self.grace_s, seen / self.min_rate_bps) - elapsed)
            try:
                msg = await asyncio.wait_for(receive(), max(wait, 0.001))
            except TimeoutError:
                late = time.monotonic() - t0
                raise fail(
                    ClientError(
                        408,
                        "upload_too_slow",
                        f"the upload stalled: {seen} bytes in {late:.0f} s (no gap over "
                        f"{self.idle_timeout_s:g} s and at least {self.min_rate_bps / 1000:g} kB/s after "
                        f"{self.grace_s:g} s are required)",
                        "file",
                        {"Connection": "close"},
                    )
                ) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    try:
                        self.gate.admit()
                    except ServiceUnavailable as e:
                        raise fail(e) from None
                    self.uploads.release()
                    holding = "queue"
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal sent
            if stopped is not None:
                return  # the app's answer to a stopped upload is replaced below
            sent = True
            await send(msg)

        try:
            with suppress(UploadStopped):  # usually the app turns it into an answer guarded_send drops
                await self.app(scope, paced_receive, guarded_send)
        finally:
            if holding == "upload":
                self.uploads.release()
            elif holding == "queue":
                self.gate.release()
        if stopped is not None and not sent:
            self.on_refuse(stopped.code, stopped.status)
            await refuse(stopped, scope, receive, send)


WS_KEY_PREFIX = "openai-insecure-api-key."


def presented_key(scope: Scope) -> str:
    """The API key a request or WebSocket presents ("" when none): ``Authorization: Bearer <key>``,
    or on a WebSocket OpenAI's browser subprotocol ``openai-insecure-api-key.<key>`` (browsers
    cannot set headers)."""
    headers = Headers(scope=scope)
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if not token and scope["type"] == "websocket":
        for proto in headers.get("sec-websocket-protocol", "").split(","):
            if proto.strip().startswith(WS_KEY_PREFIX):
                return proto.strip()[len(WS_KEY_PREFIX) :]
    return token


class ApiKeys:
    """With keys configured, every request but the public pages (and probes) needs ``Bearer <key>``."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], protect_probes: bool):
        self.app, self.protect_probes = app, protect_probes
        self.keys = [k.encode() for k in keys]

    def _open(self, scope: Scope) -> bool:
        path = scope["path"]
        return (
            not self.keys
            or scope["method"] == "OPTIONS"
            or path in PUBLIC_PATHS
            or (path.startswith(OPEN_PATHS) and not self.protect_probes)
        )

    def _valid(self, token: str) -> bool:
        # Compare with every key in constant time, so timing does not reveal a key's prefix.
        return any([hmac.compare_digest(token.strip().encode(), k) for k in self.keys])

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """WebSockets: the key as ``presented_key`` finds it. Refused: close 1008."""
        token = presented_key(scope)
        if token and self._valid(token):
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": "missing or invalid API key"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.keys:
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or self._open(scope):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            err = ClientError(
                401,
                "missing_api_key",
                "this server requires an API key: send 'Authorization: Bearer <key>'",
                "Authorization",
                {"WWW-Authenticate": "Bearer"},
            )
            return await refuse(err, scope, receive, send)
        if not self._valid(token):
            return await refuse(
                ClientError(403, "invalid_api_key", "the API key is not valid", "Authorization"), scope, receive, send
            )
        await self.app(scope, receive, send)


class RequestLog:
    """Request id (X-Request-ID, echoed; generated when absent) and one log line per request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = Headers(scope=scope).get("x-request-id", "")
        if not (0 < len(rid) <= 128 and rid.isprintable()):
            rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500  # what the client gets if the app fails before answering

        async def send_with_id(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                MutableHeaders(scope=msg).append("X-Request-ID", rid)
            await send(msg)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            fields = {
                "request_id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                "client": client[0] if client else None,
                **state.get("log_fields", {}),
            }
            # Probes and scrapes arrive every few seconds: keep them out of the info log when healthy.
            quiet = status == 200 and scope["path"].startswith(("/health", "/metrics"))
            access_log.log(logging.DEBUG if quiet else logging.INFO, "request", extra=fields)
