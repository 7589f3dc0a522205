"""Fair use of a shared server: per-client limits on requests, audio seconds and concurrency.

A client is its API key when keys are configured (the hash of the Bearer token; ``ApiKeys`` has
checked it), else its address (``scope["client"]``: behind a load balancer, run uvicorn with
``--forwarded-allow-ips`` / ``FORWARDED_ALLOW_IPS`` so it is the client's, not the balancer's).

Three limits, each off at 0 (the default: one user owns a single-user server):
- ``ASR_QUOTA_REQUESTS_PER_MIN``: a token bucket of that many requests, refilled evenly over the
  minute, so a burst of the whole minute's worth is allowed and then one request per 60/N s.
- ``ASR_QUOTA_AUDIO_S_PER_MIN``: the same bucket in seconds of audio. A request's length is
  known only once its audio is decoded, so it is charged after it is served and a request is
  admitted while the bucket is not in debt: a client can overrun its minute by one request
  (at most ``ASR_MAX_DURATION_S``) and then waits until the debt is paid back.
- ``ASR_QUOTA_CONCURRENT``: requests in flight at once.
Past a limit: ``429`` with ``Retry-After`` (when the bucket next admits) and a code naming the
limit, before any of the body is read, so the refused request costs the server nothing.

Live sessions (OpenAI Realtime, Wyoming) draw on the same buckets (``service.live.hub``): opening
one is a request and holds a concurrency slot while it lasts, and its audio is charged as it
arrives; a session whose client's audio bucket runs dry ends its turn in progress (its final
transcript goes out) and is closed with an ``audio_quota_exceeded`` error.

The table of clients is bounded (``MAX_CLIENTS``): the least recently seen client without a
request in flight is forgotten first (after 10,000 others, its bucket has almost always refilled),
so many addresses cannot grow memory without bound.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ClientError
from service.middleware import presented_key, refuse

MAX_CLIENTS = 10_000


@dataclass
class _Client:
    requests: float  # tokens left in the request bucket
    audio_s: float  # seconds left in the audio bucket (negative: in debt)
    stamp: float  # when both were last refilled
    in_flight: int = 0


@dataclass
class Quotas:
    """The limits and the per-client buckets. Used from the event loop only (no locking)."""

    requests_per_min: float = 0.0
    audio_s_per_min: float = 0.0
    concurrent: int = 0
    clock: Callable[[], float] = time.monotonic
    max_clients: int = MAX_CLIENTS
    _clients: OrderedDict[str, _Client] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_min or self.audio_s_per_min or self.concurrent)

    def clients(self) -> int:
        return len(self._clients)

    def _refill(self, c: _Client, now: float) -> None:
        elapsed = now - c.stamp
        c.requests = min(self.requests_per_min, c.requests + elapsed * self.requests_per_min / 60)
        c.audio_s = min(self.audio_s_per_min, c.audio_s + elapsed * self.audio_s_per_min / 60)
        c.stamp = now

    def _get(self, key: str) -> _Client:
        now = self.clock()
        c = self._clients.get(key)
        if c is None:
            self._evict()
            c = self._clients[key] = _Client(self.requests_per_min, self.audio_s_per_min, now)
        else:
            self._refill(c, now)
            self._clients.move_to_end(key)
        return c

    def _evict(self) -> None:
        """Make room: forget the least recently seen clients with no request in flight."""
        while len(self._clients) >= self.max_clients:
            key = next((k for k, c in self._clients.items() if c.in_flight == 0), None)
            if key is None:  # every client has a request in flight (bounded by the queue): grow
                return
            del self._clients[key]

    def admit(self, key: str) -> None:
        """Take a request slot for ``key`` or raise a 429 ``ClientError`` saying which limit and when."""
        c = self._get(key)
        if self.concurrent and c.in_flight >= self.concurrent:
            raise _limited(
                "too_many_concurrent_requests",
                f"this client has {c.in_flight} requests in progress; at most {self.concurrent} at once",
                1,
            )
        if self.audio_s_per_min and c.audio_s < 0:
            wait = -c.audio_s / (self.audio_s_per_min / 60)
            raise _limited(
                "audio_quota_exceeded",
                f"this client's audio quota of {self.audio_s_per_min:g} s per minute is used up "
                f"({-c.audio_s:.1f} s over)",
                wait,
            )
        if self.requests_per_min:
            if c.requests < 1:
                wait = (1 - c.requests) / (self.requests_per_min / 60)
                raise _limited(
                    "rate_limited", f"more than {self.requests_per_min:g} requests per minute from this client", wait
                )
            c.requests -= 1
        c.in_flight += 1

    def release(self, key: str, audio_s: float) -> None:
        """The request of ``key`` is done; charge the seconds of audio it carried."""
        c = self._get(key)
        c.in_flight = max(0, c.in_flight - 1)
        if self.audio_s_per_min:
            c.audio_s -= audio_s

    def charge(self, key: str, audio_s: float) -> None:
        """Live audio as it arrives (a session is admitted, and released with 0 s, like a request):
        a 429 ``ClientError`` once the client's audio bucket is empty, so a stream cannot outrun
        the quota by more than the chunk that emptied it."""
        if not self.audio_s_per_min:
            return
        c = self._get(key)
        c.audio_s -= audio_s
        if c.audio_s < 0:
            raise _limited(
                "audio_quota_exceeded",
                f"this client's audio quota of {self.audio_s_per_min:g} s per minute is used up",
                -c.audio_s / (self.audio_s_per_min / 60),
            )


def _limited(code: str, message: str, wait_s: float) -> ClientError:
    retry = max(1, math.ceil(wait_s))
    return ClientError(429, code, f"{message}; retry in {retry} s", None, {"Retry-After": str(retry)})


def client_key(scope: Scope, keyed: bool) -> str:
    """Who is asking: ``key:<hash>`` of its API key when keys are in use, else ``ip:<address>``."""
    token = presented_key(scope) if keyed else ""
    if token:
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    client = scope.get("client")
    return address_key(client[0] if client else None)


def address_key(host: str | None) -> str:
    """The client key of an address (connections without API keys: Wyoming, or keys unset)."""
    return "ip:" + (host or "unknown")


class QuotaLimit:
    """ASGI middleware applying ``Quotas`` to the transcription routes (inside ``ApiKeys``)."""

    def __init__(
        self,
        app: ASGIApp,
        quotas: Quotas,
        paths: tuple[str, ...],
        keyed: bool,
        on_refuse: Callable[[str, int], None],
    ):
        self.app, self.quotas, self.paths, self.keyed, self.on_refuse = app, quotas, paths, keyed, on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.quotas.enabled
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in self.paths
        ):
            await self.app(scope, receive, send)
            return
        key = client_key(scope, self.keyed)
        try:
            self.quotas.admit(key)
        except ClientError as e:
            self.on_refuse(e.code, e.status)
            await refuse(e, scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            fields = scope.get("state", {}).get("log_fields") or {}
            self.quotas.release(key, float(fields.get("audio_s") or 0.0))
