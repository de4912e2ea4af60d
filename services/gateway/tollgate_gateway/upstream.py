"""The one pooled HTTP client to the upstream, and its health.

aiohttp's client, not httpx: measured on this machine inside a bare proxy, aiohttp spends
about a tenth of the CPU of httpx's default transport per request (see
docs/performance.md); the upstream client is most of a Python proxy's cost. One session
with keep-alive connections is created at start-up and shared by every request.

Idle connections are dropped after `KEEPALIVE_SECONDS`, less than uvicorn's (and so
vLLM's) 5 s keep-alive timeout, so the gateway never sends a request on a connection the
upstream is closing at the same moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

import aiohttp
from yarl import URL

from tollgate_gateway.settings import Settings

log = logging.getLogger("tollgate.upstream")

KEEPALIVE_SECONDS = 4.0


class Upstream:
    def __init__(self, settings: Settings, on_models: Callable[[], None] = lambda: None) -> None:
        base = settings.upstream_base
        self.base = base
        self.url = {
            path: URL(base + path, encoded=True)
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health")
        }
        self.authorization = f"Bearer {settings.vllm_api_key}" if settings.vllm_api_key else None
        connect = settings.upstream_connect_timeout_seconds
        self.timeout_full = aiohttp.ClientTimeout(
            total=None,
            connect=connect,
            sock_connect=connect,
            sock_read=settings.upstream_first_byte_timeout_seconds,
        )
        self.timeout_stream = aiohttp.ClientTimeout(
            total=None,
            connect=connect,
            sock_connect=connect,
            sock_read=settings.upstream_stream_idle_timeout_seconds,
        )
        self._max_connections = settings.upstream_max_connections
        self._health_interval = settings.upstream_health_interval_seconds
        self._health_timeout = aiohttp.ClientTimeout(total=min(2.0, self._health_interval))
        self.session: aiohttp.ClientSession | None = None
        self.healthy = False
        # The model ids the upstream lists (/v1/models), read when it becomes healthy.
        self.models: frozenset[str] = frozenset()
        self._on_models = on_models
        self._health_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=KEEPALIVE_SECONDS,
            ttl_dns_cache=10,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            # The gateway forwards the client's own headers; aiohttp adds none of its own,
            # and asks for no compression, so usage can be read from the bytes.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            auto_decompress=False,
        )
        await self.check_health()
        self._health_task = asyncio.create_task(self._poll_health(), name="upstream-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.session is not None:
            await self.session.close()

    async def check_health(self) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(self.url["/health"], timeout=self._health_timeout) as r:
                healthy = r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        if healthy and not self.healthy:
            await self._read_models()
        if healthy != self.healthy:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "upstream %s",
                "healthy" if healthy else "unhealthy",
                extra={"event": "upstream_health", "healthy": healthy, "upstream": self.base},
            )
        self.healthy = healthy
        return healthy

    async def _read_models(self) -> None:
        assert self.session is not None
        headers = {"authorization": self.authorization} if self.authorization else {}
        try:
            async with self.session.get(
                self.url["/v1/models"], headers=headers, timeout=self._health_timeout
            ) as r:
                listed = json.loads(await r.read())["data"] if r.status == 200 else []
            models = frozenset(m["id"] for m in listed if isinstance(m.get("id"), str))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            return
        if models != self.models:
            self.models = models
            self._on_models()

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            await self.check_health()
