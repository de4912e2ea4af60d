"""The process's own state, as readiness, drain and metrics see it."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("tollgate.gateway")


class Lifecycle:
    """Requests in flight and whether the gateway is draining: one place that the request
    path counts in and `/ready`, the drain and the metrics read."""

    def __init__(self) -> None:
        self.started_at = int(time.time())
        self.inflight = 0
        self.draining = False

    def start_drain(self) -> None:
        self.draining = True
        log.info("drain started", extra={"event": "drain", "in_flight": self.inflight})
