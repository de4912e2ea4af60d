"""`/metrics` on a port of its own (`GATEWAY_METRICS_PORT`), or on a worker's Unix socket.

The metrics carry key names, which are for operators, not clients: on their own port,
the client-facing Service (a LoadBalancer, say) never publishes them. The server runs on
the gateway's loop, so a scrape reads the same state the request path writes, without
threads or locks. It answers one request per connection (`connection: close`), all a
scraper needs: no HTTP library is loaded for it. With several workers, each serves its
own on a Unix socket and the supervisor publishes the pod's (`workers.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tollgate_gateway.metrics import CONTENT_TYPE

# A scraper sends its request head at once; a connection that does not is dropped.
HEAD_TIMEOUT_SECONDS = 10.0


class MetricsServer:
    def __init__(
        self, render: Callable[[], bytes], host: str, port: int, path: str | None = None
    ) -> None:
        """`path`: a Unix socket to serve on instead of `host`:`port`."""
        self._render = render
        self.host = host
        self.port = port
        self.path = path
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.path:
            self._server = await asyncio.start_unix_server(self._serve, self.path)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SECONDS)
            method, target, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
            if target.split(b"?", 1)[0] != b"/metrics":
                status, content_type, body = b"404 Not Found", b"text/plain", b"not found\n"
            elif method != b"GET":
                status, content_type, body = b"405 Method Not Allowed", b"text/plain", b""
            else:
                status, content_type, body = b"200 OK", CONTENT_TYPE.encode(), self._render()
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, content_type, len(body), body)
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
