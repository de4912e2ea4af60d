"""Every error the gateway answers, in the OpenAI shape the SDKs parse.

`{"error": {"message", "type", "param", "code"}}`: the SDKs map the HTTP status to an
exception class (401 AuthenticationError, 429 RateLimitError, ...) and read `code` for
the detail, so each failure here has one fixed status, type and code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str


INVALID_JSON = ErrorKind(400, "invalid_request_error", "invalid_json")
INVALID_REQUEST = ErrorKind(400, "invalid_request_error", "invalid_request")
INVALID_API_KEY = ErrorKind(401, "invalid_request_error", "invalid_api_key")
MODEL_NOT_ALLOWED = ErrorKind(403, "permission_error", "model_not_allowed")
NOT_FOUND = ErrorKind(404, "invalid_request_error", "not_found")
MODEL_NOT_FOUND = ErrorKind(404, "invalid_request_error", "model_not_found")
METHOD_NOT_ALLOWED = ErrorKind(405, "invalid_request_error", "method_not_allowed")
BODY_TOO_LARGE = ErrorKind(413, "invalid_request_error", "request_too_large")
RATE_LIMITED = ErrorKind(429, "requests", "rate_limit_exceeded")
QUOTA_EXCEEDED = ErrorKind(429, "insufficient_quota", "insufficient_quota")
UPSTREAM_UNREACHABLE = ErrorKind(502, "upstream_error", "upstream_unreachable")
UPSTREAM_ERROR = ErrorKind(502, "upstream_error", "upstream_error")
UPSTREAM_STREAM_BROKEN = ErrorKind(502, "upstream_error", "upstream_stream_broken")
UNAVAILABLE = ErrorKind(503, "service_unavailable", "upstream_circuit_open")
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


class GatewayError(Exception):
    """Raised inside the FastAPI routes; rendered by one exception handler."""

    def __init__(self, kind: ErrorKind, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = headers or {}
