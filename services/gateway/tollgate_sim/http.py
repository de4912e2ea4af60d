"""HTTP/1.1 bytes as uvicorn writes them: status lines, heads, chunked encoding, and the one
JSON serializer every route uses (so the spaced style applies to every body and event)."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

LAST_CHUNK = b"0\r\n\r\n"
JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact JSON, as Starlette's JSONResponse and pydantic's model_dump_json write it."""
    return _COMPACT(obj).encode()


def respace(data: bytes) -> bytes:
    """Re-serialize compact JSON (a body, or the `data:` lines of SSE events) with
    json.dumps' default separators. Only the spaced style pays for it."""
    if data[:1] in (b"{", b"["):
        return json.dumps(json.loads(data), ensure_ascii=False).encode()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: {"):
            spaced = json.dumps(json.loads(line[6:]), ensure_ascii=False)
            lines[i] = b"data: " + spaced.encode()
    return b"\n".join(lines)


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def response(
    status: int,
    body: bytes,
    keep_alive: bool,
    content_type: bytes | None,
    chunked: bool = False,
) -> bytes:
    head = [b"HTTP/1.1 %d %s\r\nserver: uvicorn\r\n" % (status, _PHRASES.get(status, b""))]
    if chunked:
        head.append(b"transfer-encoding: chunked\r\n")
    else:
        head.append(b"content-length: %d\r\n" % len(body))
    if content_type:
        head.append(b"content-type: " + content_type + b"\r\n")
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    if chunked:
        head.append((chunk(body) if body else b"") + LAST_CHUNK)
    else:
        head.append(body)
    return b"".join(head)


def stream_head(keep_alive: bool, content_type: bytes = SSE) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\ncontent-type: "
        + content_type
        + b"\r\ntransfer-encoding: chunked\r\n"
        + (b"" if keep_alive else b"connection: close\r\n")
        + b"\r\n"
    )
