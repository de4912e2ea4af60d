"""`tollgate-gateway`: load the settings, run the gateway under uvicorn, drain on SIGTERM.

uvicorn already stops accepting and waits for in-flight requests on SIGTERM; what it
lacks is the readiness step before that (so a load balancer stops sending first) and a
clean exit status: it re-raises the signal after shutting down, which makes Kubernetes
see a crash. `DrainingServer` adds both.
"""

from __future__ import annotations

import logging
import sys
import time
from types import FrameType

import uvicorn

from tollgate_gateway.app import Gateway
from tollgate_gateway.config_watch import ConfigError
from tollgate_gateway.logs import configure_logging
from tollgate_gateway.settings import SettingsError, load_settings

log = logging.getLogger("tollgate.gateway")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, delay: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.delay = delay
        self._drain_since: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_since is not None:
            # A second signal: stop waiting for in-flight requests.
            self.should_exit = self.force_exit = True
            return
        self._drain_since = time.monotonic()
        self.gateway.start_drain()
        if self.delay <= 0:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_since is not None and time.monotonic() - self._drain_since >= self.delay:
            self.should_exit = True
        return await super().on_tick(counter)


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"tollgate-gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level)
    try:
        gateway = Gateway(settings)
    except (ConfigError, ValueError) as exc:
        print(f"tollgate-gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    config = uvicorn.Config(
        gateway,
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        # The gateway decides itself whether to believe X-Forwarded-For (ratelimit.py).
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.gateway_drain_seconds),
        backlog=2048,
    )
    server = DrainingServer(config, gateway, settings.gateway_shutdown_delay_seconds)
    server.run()
    if not server.started:
        sys.exit(3)


if __name__ == "__main__":
    main()
