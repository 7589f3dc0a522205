"""Errors a client can cause, each with an HTTP status and a stable machine-readable code.

Defined here, not in the API layer, so the core modules (audio, models) can raise them
without importing FastAPI; ``service.app`` turns them into JSON bodies.
"""

from __future__ import annotations


class ClientError(Exception):
    """A request the service refuses; ``status`` is a 4xx, ``code`` a stable identifier."""

    def __init__(self, status: int, code: str, message: str, param: str | None = "file"):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


class ServiceUnavailable(Exception):
    """The service cannot answer now (model loading or broken); maps to 503."""

    def __init__(self, code: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
