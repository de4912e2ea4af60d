"""`/health`, `/ready` and (beside the API) `/metrics`, in raw ASGI.

Kubernetes and Prometheus call these every few seconds, and they must answer as soon as
the process serves: they stay off FastAPI, which the other side routes (`routes.py`)
load on their first request.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from tollgate_gateway import errors
from tollgate_gateway.asgi import Send, send_refusal
from tollgate_gateway.errors import Refusal
from tollgate_gateway.lifecycle import Lifecycle
from tollgate_gateway.metrics import CONTENT_TYPE
from tollgate_gateway.upstream import UpstreamPool


class Probes:
    def __init__(
        self,
        lifecycle: Lifecycle,
        pool: UpstreamPool,
        render_metrics: Callable[[], bytes] | None,
    ) -> None:
        """`render_metrics` None: metrics are served on their own port, not here."""
        self._lifecycle = lifecycle
        self._pool = pool
        self._render_metrics = render_metrics
        self.paths = {"/health", "/ready"} | ({"/metrics"} if render_metrics else set())

    async def answer(self, path: str, send: Send, request_id: str) -> None:
        if path == "/health":  # liveness: the process serves requests
            await _send(send, 200, b"application/json", b'{"status":"ok"}', request_id)
        elif path == "/ready":
            # Readiness: the gateway can answer (not draining). Upstream trouble is
            # reported here but does not fail it: clients then get a 503 that says why.
            if self._lifecycle.draining:
                refusal = Refusal(errors.NOT_READY, "Not ready: draining.")
                await send_refusal(send, refusal, request_id)
                return
            body = {"status": "ready", "upstream_problems": self._pool.problems()}
            await _send(send, 200, b"application/json", json.dumps(body).encode(), request_id)
        else:  # /metrics: Prometheus exposition; no key (the network keeps scrapers out)
            assert self._render_metrics is not None
            metrics = self._render_metrics()
            await _send(send, 200, CONTENT_TYPE.encode(), metrics, request_id)


async def _send(send: Send, status: int, content_type: bytes, body: bytes, request_id: str) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
