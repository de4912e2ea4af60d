"""Liveness and metrics endpoints, each on its own port (aiohttp, on kopf's event loop).

`/healthz` answers 200 only when
- the event loop runs: it serves the request itself (a stuck loop answers nothing, so the
  probe times out), and a heartbeat task that should wake every second has not been late
  by more than `max_loop_lag` seconds;
- the API server answered within `max_api_silence` seconds: every replica talks to it at
  least every lease retry period (the Lease read / renewal; without leader election, a
  GET /version every few seconds), so silence means the API server is unreachable or
  this process' connections are dead: kopf's watch streams go through the same network
  and credentials and cannot be alive either;
- kopf, on the leader, has not stopped by itself.
Otherwise 503 with the reasons as JSON. `/metrics` is Prometheus' text format (metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics

log = logging.getLogger(__name__)


@dataclass
class Health:
    max_api_silence: float = 60.0
    max_loop_lag: float = 10.0
    # monotonic time of the API server's last answer (None: never yet)
    last_contact: Callable[[], float | None] = lambda: None
    leading: Callable[[], bool] = lambda: False
    operator_task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    loop_lag: float = 0.0

    def api_silence(self) -> float:
        last = self.last_contact()
        return time.monotonic() - (last if last is not None else self.started)

    def problems(self) -> list[str]:
        found = []
        silence = self.api_silence()
        if silence > self.max_api_silence:
            found.append(f"the API server has not answered for {silence:.0f} s")
        if self.loop_lag > self.max_loop_lag:
            found.append(f"the event loop was stuck for {self.loop_lag:.1f} s")
        task = self.operator_task
        if task is not None and task.done():
            found.append("kopf has stopped")
        return found

    async def heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(1.0)
            self.loop_lag = max(0.0, loop.time() - before - 1.0)

    async def healthz(self, _: web.Request) -> web.Response:
        problems = self.problems()
        body = {
            "status": "unhealthy" if problems else "ok",
            "problems": problems,
            "leader": self.leading(),
            "apiSilenceSeconds": round(self.api_silence(), 3),
            "loopLagSeconds": round(self.loop_lag, 3),
        }
        return web.json_response(body, status=503 if problems else 200)


async def _metrics(_: web.Request) -> web.Response:
    data = generate_latest(metrics.REGISTRY)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(url: str, route: Callable[[web.Request], Awaitable[web.Response]]) -> web.AppRunner:
    """Serve `route` at the path of `url` (e.g. http://0.0.0.0:8081/healthz)."""
    parts = urlsplit(url)
    app = web.Application()
    app.router.add_get(parts.path or "/", route)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, parts.hostname or "0.0.0.0", parts.port or 80)
    await site.start()
    log.info("serving %s", url)
    return runner


class Endpoints:
    """The liveness and metrics servers plus the heartbeat, for the process' lifetime."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, liveness: str, metrics_url: str) -> None:
        self._tasks.append(asyncio.create_task(self.health.heartbeat(), name="heartbeat"))
        if liveness:
            self._runners.append(await serve(liveness, self.health.healthz))
        if metrics_url:
            self._runners.append(await serve(metrics_url, _metrics))
        metrics.API_AGE.set_function(self.health.api_silence)

    def add_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.append(task)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in self._runners:
            await runner.cleanup()
