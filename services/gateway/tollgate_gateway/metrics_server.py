"""`/metrics` on a port of its own (`GATEWAY_METRICS_PORT`), or on a worker's Unix socket.

The metrics carry key names, which are for operators, not clients: on their own port,
the client-facing Service (a LoadBalancer, say) never publishes them. aiohttp's server
(aiohttp is already in the process for the health polls) runs on the gateway's loop, so
a scrape reads the same state the request path writes, without threads or locks. With
several workers, each serves its own on a Unix socket and the supervisor publishes the
pod's (`workers.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from tollgate_gateway.metrics import CONTENT_TYPE


class MetricsServer:
    def __init__(
        self, render: Callable[[], bytes], host: str, port: int, path: str | None = None
    ) -> None:
        """`path`: a Unix socket to serve on instead of `host`:`port`."""
        self._render = render
        self.host = host
        self.port = port
        self.path = path
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite = (
            web.UnixSite(self._runner, self.path)
            if self.path
            else web.TCPSite(self._runner, self.host, self.port)
        )
        await site.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._render(), headers={"content-type": CONTENT_TYPE})
