"""The errors a request can end in, and the one function that turns any of them into a JSON body.

Every refusal is a ``ServiceError`` with an HTTP status, a stable machine-readable ``code``, a
message for people and the parameter at fault. The core modules (audio, models, scheduler)
raise them without importing FastAPI; ``service.app``'s one handler and the batch route (one
result per file) both render them with ``error_body``, so a code's message never drifts between
the two. The body has the shape OpenAI-compatible clients already parse:
``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request that ends without a transcript; ``status`` is its HTTP status."""

    status: int = 500

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers


class ClientError(ServiceError):
    """A request the service refuses because of what was sent (a 4xx)."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = "file", headers: dict[str, str] | None = None
    ):
        super().__init__(code, message, param, status=status, headers=headers)


class ServiceUnavailable(ServiceError):
    """The service cannot answer now (model loading or broken, queue full, shutting down): 503."""

    status = 503

    def __init__(self, code: str, message: str, retry_after_s: int | None = None):
        super().__init__(code, message, headers={"Retry-After": str(retry_after_s)} if retry_after_s else None)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    """The job waited in the queue past its deadline and was dropped before compute: 504."""

    status = 504

    def __init__(self, waited_s: float):
        super().__init__(
            "deadline_exceeded",
            f"the request waited {waited_s:.2f} s in the queue without reaching compute; "
            "the server is busy: retry later, or allow more time with X-Request-Timeout",
        )
        self.waited_s = waited_s


class ClientGone(ServiceError):
    """The client closed the connection while its audio waited or ran; its work was dropped.

    499 (nginx's convention) is only ever logged and counted: nobody is left to read it.
    """

    status = 499

    def __init__(self) -> None:
        super().__init__("client_disconnected", "the client closed the connection")


class InternalError(ServiceError):
    """A bug: the details go to the server log, never to the client."""

    def __init__(self) -> None:
        super().__init__("internal_error", "internal error; the server log has the details")


def error_type(status: int) -> str:
    """OpenAI's ``type`` field: whose problem it is."""
    if status < 500:
        return "invalid_request_error"
    return "service_unavailable" if status in (503, 504) else "server_error"


def error_body(err: ServiceError) -> dict[str, Any]:
    """The JSON body of ``err``: ``{"error": {"message", "type", "code", "param"}}``."""
    return {"error": {"message": err.message, "type": error_type(err.status), "code": err.code, "param": err.param}}
