"""The gateway as one ASGI application.

The two completion routes go straight to the raw proxy; everything else (health,
readiness, models, FastAPI's lifespan) goes to FastAPI. `Gateway` also owns the shared
parts the request path uses: keys, breaker, upstream client, usage sink.
"""

from __future__ import annotations

import logging
import time
from time import perf_counter

from tollgate_gateway import errors
from tollgate_gateway.asgi import Receive, Scope, Send, send_error
from tollgate_gateway.breaker import CircuitBreaker, State
from tollgate_gateway.errors import GatewayError
from tollgate_gateway.exchange import Exchange
from tollgate_gateway.keys import ApiKey, KeyRing
from tollgate_gateway.logs import AccessLog
from tollgate_gateway.proxy import PROXY_PATHS, Proxy
from tollgate_gateway.routes import build_api
from tollgate_gateway.settings import Settings
from tollgate_gateway.upstream import Upstream
from tollgate_gateway.usage import UsageSink, UsageTotals

log = logging.getLogger("tollgate.gateway")


class Gateway:
    def __init__(self, settings: Settings, usage: UsageSink | None = None) -> None:
        self.settings = settings
        self.keys = KeyRing.from_entries(settings.gateway_api_keys)
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold, settings.breaker_open_seconds
        )
        self.upstream = Upstream(settings)
        self.usage: UsageSink = usage if usage is not None else UsageTotals()
        self.access_log = AccessLog()
        self.draining = False
        self.started_at = int(time.time())
        self.proxy = Proxy(self)
        self.api = build_api(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROXY_PATHS:
            if scope["method"] == "POST":
                await self.proxy.handle(scope, receive, send)
            else:
                await send_error(
                    send, errors.METHOD_NOT_ALLOWED, "Use POST.", headers=[(b"allow", b"POST")]
                )
            return
        await self.api(scope, receive, send)

    async def startup(self) -> None:
        await self.upstream.start()
        log.info(
            "gateway started",
            extra={
                "event": "startup",
                "upstream": self.upstream.base,
                "keys": len(self.keys),
                "upstream_healthy": self.upstream.healthy,
            },
        )

    async def shutdown(self) -> None:
        await self.upstream.close()
        await self.usage.aclose()
        self.access_log.flush()
        log.info("gateway stopped", extra={"event": "shutdown"})

    def authenticate(self, authorization: str | None) -> ApiKey:
        key = self.keys.authenticate(authorization.encode() if authorization else None)
        if key is None:
            raise GatewayError(errors.INVALID_API_KEY, "Incorrect or missing API key.")
        return key

    def readiness_problems(self) -> list[str]:
        problems = []
        if self.draining:
            problems.append("draining")
        if not self.upstream.healthy:
            problems.append("upstream unhealthy")
        if self.breaker.state is State.OPEN:
            problems.append("circuit breaker open")
        return problems

    def start_drain(self) -> None:
        self.draining = True
        log.info("drain started", extra={"event": "drain"})

    def finish(self, ex: Exchange) -> None:
        """The one accounting hook: every request ends here, whatever happened to it."""
        if ex.usage is not None and ex.key_name is not None:
            self.usage.record(ex.key_name, ex.model or "", ex.usage)
        self.access_log.write(ex, perf_counter() - ex.started)
