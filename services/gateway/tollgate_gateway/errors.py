"""Every error the gateway answers, in the OpenAI shape the SDKs parse, and the one way
to refuse a request.

`{"error": {"message", "type", "param", "code"}}`: the SDKs map the HTTP status to an
exception class (401 AuthenticationError, 429 RateLimitError, ...) and read `code` for
the detail, so each failure here has one fixed status, type and code. Anything on the
request path that refuses a request raises `Refusal`; `response_parts` renders it, for the
raw proxy and the FastAPI routes alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str


INVALID_JSON = ErrorKind(400, "invalid_request_error", "invalid_json")
INVALID_REQUEST = ErrorKind(400, "invalid_request_error", "invalid_request")
INVALID_ENCODING = ErrorKind(400, "invalid_request_error", "invalid_encoding")
INVALID_API_KEY = ErrorKind(401, "invalid_request_error", "invalid_api_key")
MODEL_NOT_ALLOWED = ErrorKind(403, "permission_error", "model_not_allowed")
NOT_FOUND = ErrorKind(404, "invalid_request_error", "not_found")
MODEL_NOT_FOUND = ErrorKind(404, "invalid_request_error", "model_not_found")
METHOD_NOT_ALLOWED = ErrorKind(405, "invalid_request_error", "method_not_allowed")
BODY_TOO_LARGE = ErrorKind(413, "invalid_request_error", "request_too_large")
HEAD_TOO_LARGE = ErrorKind(431, "invalid_request_error", "request_header_too_large")
RATE_LIMITED = ErrorKind(429, "requests", "rate_limit_exceeded")
QUOTA_EXCEEDED = ErrorKind(429, "insufficient_quota", "insufficient_quota")
UPSTREAM_UNREACHABLE = ErrorKind(502, "upstream_error", "upstream_unreachable")
UPSTREAM_ERROR = ErrorKind(502, "upstream_error", "upstream_error")
UPSTREAM_STREAM_BROKEN = ErrorKind(502, "upstream_error", "upstream_stream_broken")
UNAVAILABLE = ErrorKind(503, "service_unavailable", "upstream_circuit_open")
SHUTTING_DOWN = ErrorKind(503, "service_unavailable", "gateway_shutting_down")
OVERLOADED = ErrorKind(503, "service_unavailable", "gateway_overloaded")
NOT_READY = ErrorKind(503, "service_unavailable", "not_ready")
NO_UPSTREAM = ErrorKind(503, "service_unavailable", "no_healthy_upstream")
QUOTA_STORE_UNAVAILABLE = ErrorKind(503, "service_unavailable", "quota_store_unavailable")
UPSTREAM_TIMEOUT = ErrorKind(504, "upstream_error", "upstream_timeout")
INTERNAL = ErrorKind(500, "internal_error", "internal_error")


def error_body(kind: ErrorKind, message: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": kind.type, "param": param, "code": kind.code}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def is_openai_error(body: bytes) -> bool:
    """Whether an upstream error body already has the shape SDKs parse."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


class Refusal(Exception):
    """A request answered with an error before any response byte was sent.

    `reason` is set when the gateway refused it itself (the rejection metric's label);
    `upstream_error` when the upstream failed (the upstream error metric's kind).
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        retry_after: float | None = None,
        *,
        reason: str | None = None,
        upstream_error: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.reason = reason
        self.upstream_error = upstream_error
        self.param = param
        self.headers = list(headers or [])
        if retry_after is not None:
            # (less a hair, so that 10.000000001 s of float arithmetic says 10)
            seconds = max(1, math.ceil(retry_after - 1e-6))
            self.headers.append((b"retry-after", b"%d" % seconds))


def response_parts(
    refusal: Refusal, request_id: str = ""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a refusal: the one renderer of every gateway error."""
    body = error_body(refusal.kind, refusal.message, refusal.param)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend(refusal.headers)
    return refusal.kind.status, headers, body
