"""The gateway as one ASGI application: the parts, wired together.

`Gateway` builds each part from the settings and hands every part what it needs, nothing
more; no module imports this one. The proxied routes (`endpoints.py`) go straight to the
raw proxy, the probes and the lifespan are answered raw too, and everything else (models,
usage, unknown paths) goes to FastAPI, loaded on the first such request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from time import perf_counter
from typing import TYPE_CHECKING

from tollgate_gateway import endpoints, errors
from tollgate_gateway.asgi import Receive, Scope, Send, request_id_for, send_refusal
from tollgate_gateway.config_watch import ConfigWatcher, CurrentConfig, env_policy
from tollgate_gateway.errors import Refusal
from tollgate_gateway.fairqueue import FairQueue
from tollgate_gateway.keys import KeyRing, env_keys
from tollgate_gateway.lifecycle import Lifecycle
from tollgate_gateway.logs import AccessLog
from tollgate_gateway.metrics import GatewayMetrics, StateCollector
from tollgate_gateway.metrics_server import MetricsServer
from tollgate_gateway.models import ModelRoutes
from tollgate_gateway.podshare import PodShare
from tollgate_gateway.probes import Probes
from tollgate_gateway.proxy import NEVER_FORWARDED, Proxy, ProxySettings
from tollgate_gateway.quota import QuotaLedger
from tollgate_gateway.ratelimit import ClientAddress, Gcra
from tollgate_gateway.record import RequestRecord
from tollgate_gateway.settings import Settings
from tollgate_gateway.stores import open_store
from tollgate_gateway.upstream import UpstreamPool

if TYPE_CHECKING:  # imported only when the configuration uses them
    from tollgate_gateway.asgi import ASGIApp
    from tollgate_gateway.config_secret import SecretWatcher
    from tollgate_gateway.tracing import Tracing

log = logging.getLogger("tollgate.gateway")


class Gateway:
    def __init__(
        self, settings: Settings, share: PodShare, metrics_socket: str | None = None
    ) -> None:
        """`share`: the limits this process shares with the pod's other workers (if any);
        `metrics_socket`: a worker's, where the supervisor collects its metrics."""
        self.settings = settings
        self.lifecycle = Lifecycle()
        self.current = CurrentConfig()
        policy = env_policy(
            settings.gateway_default_requests_per_minute,
            settings.gateway_default_tokens_per_minute,
            settings.gateway_default_tokens_per_day,
            settings.gateway_default_max_concurrent_requests,
        )
        self.config = ConfigWatcher(
            settings.gateway_config_file,
            env_keys(settings.gateway_api_keys, policy),
            self._use_config,
            settings.gateway_config_poll_seconds,
        )
        self.config_secret: SecretWatcher | None = None
        if settings.gateway_config_secret:
            from tollgate_gateway.config_secret import SecretWatcher

            self.config_secret = SecretWatcher(
                settings.gateway_config_secret,
                self.config,
                settings.gateway_kube_api_url,
                settings.gateway_kube_token_file,
                settings.gateway_kube_ca_file,
            )
        self.quota = QuotaLedger(
            open_store(settings.database_url, settings.quota_db_schema, settings.gateway_workers),
            settings.quota_flush_interval_seconds,
            settings.quota_fail_closed,
            exact_margin=settings.quota_exact_margin,
            counts=share.keys,
            workers=settings.gateway_workers,
        )
        self.pool = UpstreamPool(settings, on_models=self._update_known_models)
        self.queue = (
            FairQueue(self.pool.has_room, settings.gateway_queue_timeout_seconds, self.pool.places)
            if settings.gateway_upstream_max_in_flight is not None
            else None
        )
        self.metrics = GatewayMetrics(
            StateCollector(
                self.lifecycle, self.pool, self.quota, self.current, self.config, self.queue
            )
        )
        self.quota.on_flush = self.metrics.observe_flush
        self.access_log = AccessLog(
            worker=share.keys.worker if settings.gateway_workers > 1 else None
        )
        self.tracing: Tracing | None = None
        if settings.enable_otlp_tracing:
            from tollgate_gateway.tracing import Tracing, otlp_exporter

            self.tracing = Tracing(settings.otel_service_name, otlp_exporter(settings))
        self.proxy = Proxy(
            proxy_settings(settings, self.pool),
            self.current,
            Gcra(settings.gateway_ip_rate_per_second, settings.gateway_ip_burst, share.rates)
            if settings.gateway_ip_rate_per_second > 0
            else None,
            ClientAddress(settings.gateway_trusted_proxies),
            self.quota,
            self.pool,
            self.queue,
            self.lifecycle,
            self.tracing,
            self.settle,
        )
        metrics_here = settings.gateway_metrics_port is None and metrics_socket is None
        self.probes = Probes(
            self.lifecycle, self.pool, self.metrics.render if metrics_here else None
        )
        self._side_api: asyncio.Future[ASGIApp] | None = None
        self.metrics_server = (
            None
            if metrics_here
            else MetricsServer(
                self.metrics.render,
                settings.gateway_host,
                settings.gateway_metrics_port or 0,
                metrics_socket,
            )
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.config.load()  # ConfigError stops the start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            endpoint, known = endpoints.match(method, path)
            if endpoint is not None:
                await self.proxy.handle(scope, receive, send, endpoint)
                return
            if known or path in self.probes.paths:
                presented = dict(scope["headers"]).get(b"x-request-id")
                request_id = request_id_for(presented)
                if method in ("GET", "HEAD") and not known:
                    await self.probes.answer(path, send, request_id)
                    return
                refusal = Refusal(errors.METHOD_NOT_ALLOWED, "Method not allowed on this route.")
                await send_refusal(send, refusal, request_id)
                return
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await (await self.side_api())(scope, receive, send)

    async def side_api(self) -> ASGIApp:
        """The FastAPI routes, built on first use in a thread: importing FastAPI takes
        about 0.4 s of CPU, which would stall every request in flight on the loop."""
        if self._side_api is None:
            self._side_api = asyncio.ensure_future(asyncio.to_thread(self._build_side_api))
        return await asyncio.shield(self._side_api)

    def _build_side_api(self) -> ASGIApp:
        from tollgate_gateway.routes import build_api

        return build_api(
            self.current, self.pool, self.quota, self.lifecycle, self.settings.served_model_name
        )

    def settle(self, record: RequestRecord) -> None:
        """Step 8 of every request, whatever happened to it: quota, trace, metrics, log."""
        if record.admission is not None:
            self.quota.settle(record.admission, record.usage)
        latency = perf_counter() - record.started
        if record.trace is not None:
            record.trace.end(record)
        self.metrics.observe(record, latency)
        self.access_log.write(record, latency)

    def _use_config(
        self, keys: KeyRing, version: str, models: ModelRoutes, upstreams: list[str] | None
    ) -> None:
        self.current.use(keys, version, models)
        if upstreams is not None:
            self.pool.use_bases(upstreams, "config")
        self._update_known_models()

    def _update_known_models(self) -> None:
        """Models that get their own metrics label: served, listed upstream, or allowed."""
        known = self.pool.models()
        if self.settings.served_model_name:
            known.add(self.settings.served_model_name)
        known.update(self.current.ring.models())
        known.update(self.current.models.names())
        self.metrics.set_known_models(known)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI's lifespan protocol: start at uvicorn's start, drain and stop at its end."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("start-up failed", extra={"event": "startup_failed"})
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.start()
        await self.quota.start(self.current.ring.names())
        await self.pool.start()
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
                "upstreams": [u.name for u in self.pool.upstreams],
                "dns_name": self.settings.vllm_dns_name,
                "keys": len(self.current.ring),
                "config_version": self.current.version,
                "metrics_port": self.settings.gateway_metrics_port,
                "quota_store": self.settings.database_url.split(":", 1)[0],
                "quota_store_up": self.quota.store_ok,
                "upstreams_available": sum(u.available() for u in self.pool.upstreams),
            },
        )

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.config_secret is not None:
            await self.config_secret.close()
        await self.pool.close()
        await self.quota.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        self.access_log.flush()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        log.info("gateway stopped", extra={"event": "shutdown"})


def proxy_settings(settings: Settings, pool: UpstreamPool) -> ProxySettings:
    forward = settings.gateway_forward_headers
    return ProxySettings(
        max_body=settings.gateway_max_body_bytes,
        max_in_flight=settings.gateway_max_in_flight,
        default_reserve=settings.quota_default_reserve_tokens,
        affinity_mode=settings.gateway_session_affinity,
        affinity_header=settings.gateway_session_header.lower().encode("latin-1"),
        forward_exact=frozenset(n.encode() for n in forward if not n.endswith("*"))
        - NEVER_FORWARDED,
        forward_prefixes=tuple(n[:-1].encode() for n in forward if n.endswith("*")),
        upstream_authorization=pool.authorization,
        timeout_whole=pool.timeout_full,
        timeout_stream=pool.timeout_stream,
    )
