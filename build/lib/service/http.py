"""HTTP helpers shared by the middleware, the error handler and the routers.

Kept apart from ``service.errors`` so the core modules that raise errors never import Starlette.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from service.errors import ClientError, ClientGone, ServiceError, error_body

T = TypeVar("T")
TIMEOUT_HEADER = "X-Request-Timeout"


def error_response(err: ServiceError) -> JSONResponse:
    """The one rendering of an error as an HTTP answer: its status, its JSON body, its headers."""
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body is read by then, so only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` unless the client leaves first; then cancel it and raise ``ClientGone``."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(request))
    await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not job.done():
        job.cancel()
        raise ClientGone
    return job.result()


def request_timeout_s(request: Request, default_s: float) -> float:
    """Longest a job may wait in the queue: X-Request-Timeout (seconds) or the server default (0 = none)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default_s if default_s > 0 else math.inf
    try:
        timeout_s = float(raw)
    except ValueError:
        timeout_s = math.nan
    if not (0 < timeout_s < 86400):
        raise ClientError(
            400, "invalid_timeout", f"{TIMEOUT_HEADER} must be seconds in (0, 86400), got {raw!r}", TIMEOUT_HEADER
        )
    return timeout_s
