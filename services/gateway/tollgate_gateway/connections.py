"""Client connections with deadlines: uvicorn's httptools protocol, guarded.

uvicorn arms a timer only for keep-alive waits *after* a response. A connection that never
sends a request, sends its headers a byte at a time (slowloris) or declares a body it never
sends holds a file descriptor and a slot forever: 500 such connections, or 5,000 idle ones,
were enough to pin a gateway's descriptors. This protocol adds what a front door needs:

- headers must be complete within `header_timeout` of the connection (or of the first byte
  of the next request on a keep-alive connection);
- a body within `body_timeout` of its headers (the request then ends as a client
  disconnect, settled like any other);
- at most `max_connections` at once: past that a new connection gets one OpenAI-shaped 503
  and is closed, before any request is parsed.

It is uvicorn's own protocol class, chosen with `uvicorn.Config(http=...)`; only the
timers and the cap are added.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tollgate_gateway import errors
from tollgate_gateway.errors import Refusal, response_parts


def guarded_protocol(
    header_timeout: float, body_timeout: float, max_connections: int
) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn, with these limits."""
    status, headers, body = response_parts(
        Refusal(
            errors.OVERLOADED,
            "The gateway is at its connection limit; retry shortly.",
            1,
        )
    )
    head = b"HTTP/1.1 %d Service Unavailable\r\n" % status
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    over_limit = head + b"connection: close\r\n\r\n" + body

    class GuardedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(over_limit)
                transport.close()
                return
            self._arm(header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(header_timeout)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm(body_timeout)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol
