"""The gateway as one ASGI application.

The two completion routes go straight to the raw proxy; everything else (health,
readiness, models, usage, FastAPI's lifespan) goes to FastAPI. `Gateway` also owns the
shared parts the request path uses: keys, limits, upstream replicas, quota ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from time import perf_counter
from typing import TYPE_CHECKING

from tollgate_gateway import errors
from tollgate_gateway.asgi import Receive, Scope, Send, send_error
from tollgate_gateway.config_secret import SecretWatcher
from tollgate_gateway.config_watch import ConfigWatcher, env_policy
from tollgate_gateway.errors import GatewayError
from tollgate_gateway.exchange import Exchange
from tollgate_gateway.keys import ApiKey, KeyRing, env_keys
from tollgate_gateway.logs import AccessLog
from tollgate_gateway.metrics import GatewayMetrics
from tollgate_gateway.proxy import PROXY_PATHS, Proxy
from tollgate_gateway.quota import QuotaLedger
from tollgate_gateway.ratelimit import ClientAddress, Gcra
from tollgate_gateway.routes import build_api
from tollgate_gateway.settings import Settings
from tollgate_gateway.stores import open_store
from tollgate_gateway.upstream import UpstreamPool

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is on
    from tollgate_gateway.tracing import Tracing

log = logging.getLogger("tollgate.gateway")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyRing()
        self.config_version = ""
        policy = env_policy(
            settings.gateway_default_requests_per_minute,
            settings.gateway_default_tokens_per_minute,
            settings.gateway_default_tokens_per_day,
            settings.gateway_default_max_concurrent_requests,
        )
        self.config = ConfigWatcher(
            settings.gateway_config_file,
            env_keys(settings.gateway_api_keys, policy),
            self._use_keys,
            settings.gateway_config_poll_seconds,
        )
        self.config_secret = (
            SecretWatcher(
                settings.gateway_config_secret,
                self.config,
                settings.gateway_kube_api_url,
                settings.gateway_kube_token_file,
                settings.gateway_kube_ca_file,
            )
            if settings.gateway_config_secret
            else None
        )
        self.ip_limit = (
            Gcra(settings.gateway_ip_rate_per_second, settings.gateway_ip_burst)
            if settings.gateway_ip_rate_per_second > 0
            else None
        )
        self.client_address = ClientAddress(settings.gateway_trusted_proxies)
        self.quota = QuotaLedger(
            open_store(settings.database_url, settings.quota_db_schema),
            settings.quota_flush_interval_seconds,
            settings.quota_fail_closed,
        )
        self.upstreams = UpstreamPool(settings, on_models=self._update_known_models)
        self.inflight = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.access_log = AccessLog()
        self.draining = False
        self.started_at = int(time.time())
        self.tracing: Tracing | None = None
        if settings.enable_otlp_tracing:
            from tollgate_gateway.tracing import Tracing

            self.tracing = Tracing(settings.otlp_endpoint)
        self.proxy = Proxy(self)
        self.api = build_api(self)
        # Its collector reads the attributes above when it is registered.
        self.metrics = GatewayMetrics(self)
        self.quota.on_flush = self.metrics.quota_flush.observe
        self.config.load()  # ConfigError stops the start

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

    def _use_keys(self, keys: KeyRing, version: str) -> None:
        self.keys = keys
        self.config_version = version
        self._update_known_models()

    def _update_known_models(self) -> None:
        """Models that get their own metrics label: served, listed upstream, or allowed."""
        known = self.upstreams.models()
        if self.settings.served_model_name:
            known.add(self.settings.served_model_name)
        known.update(self.keys.models())
        self.metrics.set_known_models(known)

    async def startup(self) -> None:
        await self.quota.start(self.keys.names())
        await self.upstreams.start()
        self._tasks.append(asyncio.create_task(self.config.watch(), name="config-watch"))
        if self.config_secret is not None:
            await self.config_secret.start()
            self._tasks.append(
                asyncio.create_task(self.config_secret.watch(), name="config-secret-watch")
            )
        log.info(
            "gateway started",
            extra={
                "event": "startup",
                "upstreams": [u.name for u in self.upstreams.upstreams],
                "dns_name": self.settings.vllm_dns_name,
                "keys": len(self.keys),
                "config_version": self.config_version,
                "quota_store": self.settings.database_url.split(":", 1)[0],
                "quota_store_up": self.quota.store_ok,
                "upstreams_available": sum(u.available() for u in self.upstreams.upstreams),
            },
        )

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.config_secret is not None:
            await self.config_secret.close()
        await self.upstreams.close()
        await self.quota.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        self.access_log.flush()
        log.info("gateway stopped", extra={"event": "shutdown"})

    def authenticate(self, authorization: str | None) -> ApiKey:
        key = self.keys.authenticate(authorization.encode() if authorization else None)
        if key is None:
            raise GatewayError(errors.INVALID_API_KEY, "Incorrect or missing API key.")
        refusal = key.refusal(time.time())
        if refusal is not None:
            raise GatewayError(errors.INVALID_API_KEY, refusal)
        return key

    def readiness_problems(self) -> list[str]:
        problems = []
        if self.draining:
            problems.append("draining")
        problems.extend(self.upstreams.readiness_problems())
        return problems

    def start_drain(self) -> None:
        self.draining = True
        log.info("drain started", extra={"event": "drain"})

    def finish(self, ex: Exchange) -> None:
        """The one accounting hook: every request ends here, whatever happened to it."""
        if ex.admission is not None:
            self.quota.settle(ex.admission, ex.usage)
        latency = perf_counter() - ex.started
        if ex.trace is not None:
            ex.trace.end(ex)
        self.metrics.observe(ex, latency)
        self.access_log.write(ex, latency)
