"""The ASGI types the raw handlers use, and the one way they send an error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tollgate_gateway.errors import ErrorKind, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_error(
    send: Send,
    kind: ErrorKind,
    message: str,
    request_id: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = error_body(kind, message)
    all_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if request_id:
        all_headers.append((b"x-request-id", request_id.encode()))
    if headers:
        all_headers.extend(headers)
    await send({"type": "http.response.start", "status": kind.status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})
