"""The few form fields the gateway needs from a multipart upload (audio routes), and one
it adds.

An audio upload is a `multipart/form-data` body whose `file` part is most of its bytes;
the gateway needs only the small text fields (`model`, `stream`,
`stream_include_usage`). They are found by scanning part headers, never by parsing or
copying the file; the body is forwarded as it came, except for one field appended before
the closing boundary when a stream's usage must be asked for.
"""

from __future__ import annotations

import re

from tollgate_gateway import errors
from tollgate_gateway.errors import Refusal

_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
# Text fields longer than this are not what the gateway looks for (the file is not read).
_FIELD_LIMIT = 256


def boundary_of(content_type: bytes | None) -> bytes:
    if not content_type or not content_type.lower().startswith(b"multipart/form-data"):
        raise Refusal(
            errors.INVALID_REQUEST,
            "This route takes a multipart/form-data upload.",
            reason="invalid",
        )
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise Refusal(
            errors.INVALID_REQUEST, "The multipart upload names no boundary.", reason="invalid"
        )
    return found.group(1)


def form_fields(body: bytes, boundary: bytes, names: frozenset[str]) -> dict[str, str]:
    """The values of the named short text fields."""
    delimiter = b"--" + boundary
    found: dict[str, str] = {}
    at = body.find(delimiter)
    while at >= 0:
        head_start = at + len(delimiter) + 2
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            break
        following = body.find(delimiter, head_end)
        if following < 0:
            break
        name = _NAME.search(body, head_start, head_end)
        if name is not None and b"filename=" not in body[head_start:head_end]:
            key = name.group(1).decode("utf-8", "replace")
            value = body[head_end + 4 : following].removesuffix(b"\r\n")
            if key in names and len(value) <= _FIELD_LIMIT:
                found[key] = value.decode("utf-8", "replace").strip()
        at = following
    return found


def with_field(body: bytes, boundary: bytes, name: str, value: str) -> bytes:
    """The body with one more text field, before its closing boundary."""
    closing = b"--" + boundary + b"--"
    at = body.rfind(closing)
    if at < 0:
        raise Refusal(
            errors.INVALID_REQUEST, "The multipart upload is not terminated.", reason="invalid"
        )
    field = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode()
        + b'"\r\n\r\n' + value.encode() + b"\r\n"
    )  # fmt: skip
    return body[:at] + field + body[at:]
