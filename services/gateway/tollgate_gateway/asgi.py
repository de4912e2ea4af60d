"""The ASGI types the raw handlers use, and the one way they send a refusal."""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tollgate_gateway.errors import Refusal, response_parts

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Write = Callable[[bytes], bool]

# The scope extension the gateway's server protocol (`connections.py`) adds:
# `scope["extensions"][ON_DISCONNECT](callback)` has `callback` run once if the client
# leaves before the response ends (at once if it already has; None takes it back). It
# replaces a task per request waiting on `receive` for `http.disconnect`.
ON_DISCONNECT = "tollgate.on_disconnect"
# And `scope["extensions"][WRITE](body)`: a piece of a chunked body under way, written at
# once, from any callback (not only a task: a stream's pieces are written from the
# upstream connection's callback as they arrive). It returns whether the client has room
# for more; when it has not, `await send(...)` of an empty piece waits for it.
WRITE = "tollgate.write"

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def request_id_for(presented: bytes | None) -> str:
    """The client's `x-request-id` when it is a sane one, else a new random id (in
    uuid4().hex's format, at a third of its cost)."""
    if presented and _REQUEST_ID.match(presented):
        return presented.decode()
    return os.urandom(16).hex()


async def send_refusal(send: Send, refusal: Refusal, request_id: str = "") -> None:
    status, headers, body = response_parts(refusal, request_id)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
