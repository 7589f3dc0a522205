"""Property-based fuzz of the HTTP API from its own OpenAPI document (schemathesis), against the
real server on the committed default model.

Schemathesis reads ``/openapi.json``, generates requests for every operation (valid ones and
ones that break the schema: wrong types, missing fields, random bytes as audio, odd model
names), sends them over real HTTP and checks each answer: never a 5xx, a documented
content type, a body that matches the documented schema, and every error in the one shape
``{"error": {"message", "type", "code", "param"}}`` with a non-empty message. The examples
are derandomized, so a failure reproduces; set ``ASR_FUZZ_EXAMPLES`` to search longer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from testkit.server import running_server

EXAMPLES = int(os.environ.get("ASR_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def fuzzed_server() -> Iterator[str]:
    # A short queue deadline and a small upload limit: nothing a fuzzer sends can take long.
    with running_server({"ASR_MAX_UPLOAD_MB": "2", "ASR_MAX_DURATION_S": "30"}) as url:
        yield url


def error_shape(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> bool:
    """Every refusal names its problem in the documented shape."""
    if response.status_code < 400:
        return True
    body = response.json()
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}, body
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["code"], str) and err["code"], body
    assert err["type"] in ("invalid_request_error", "service_unavailable", "server_error"), body
    return True


CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance, error_shape]


def test_no_5xx_and_every_error_in_shape(fuzzed_server: str) -> None:
    """Each operation of the OpenAPI document, fuzzed with hypothesis through schemathesis' strategies.

    (Driven by hand rather than by schemathesis' pytest plugin, whose fixture loader does not
    run under this pytest.)
    """
    schema = schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/transcribe", "/transcribe/batch", "/v1/audio/transcriptions"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=60)

        fuzz()
