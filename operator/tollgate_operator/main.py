"""`tollgate-operator`: run the kopf operator for the tollgate.dev resources.

Cluster-wide by default (the chart's ClusterRole); `--namespace` (repeatable) restricts it.
Only the replica holding the Lease runs the controllers (leader.py); `--liveness` and
`--metrics` serve /healthz and /metrics on their own ports (health.py, metrics.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import kopf

from . import (
    handlers,  # noqa: F401  (registers the handlers)
    metrics,
)
from .client import ApiError, KubeClient
from .health import Endpoints, Health
from .leader import ElectionConfig, LeaderElector


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tollgate-operator", description=__doc__)
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[n for n in os.environ.get("TOLLGATE_NAMESPACES", "").split(",") if n],
        help="watch only these namespaces ($TOLLGATE_NAMESPACES, comma-separated); default: all",
    )
    p.add_argument(
        "--liveness",
        default=os.environ.get("TOLLGATE_LIVENESS", ""),
        help="serve liveness here, e.g. http://0.0.0.0:8081/healthz ($TOLLGATE_LIVENESS)",
    )
    p.add_argument(
        "--metrics",
        default=os.environ.get("TOLLGATE_METRICS", ""),
        help="serve Prometheus metrics here, e.g. http://0.0.0.0:9102/metrics ($TOLLGATE_METRICS)",
    )
    p.add_argument(
        "--leader-election",
        default=os.environ.get("TOLLGATE_LEADER_ELECTION", "true").lower() not in ("0", "false"),
        action=argparse.BooleanOptionalAction,
        help="hold a Lease before running the controllers ($TOLLGATE_LEADER_ELECTION; default on)",
    )
    p.add_argument("--log-level", default=os.environ.get("TOLLGATE_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    """0 after a clean stop; 1 when leadership was lost or kopf stopped by itself."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = await KubeClient.connect()
    elector = LeaderElector(client, ElectionConfig.from_env()) if args.leader_election else None
    pinger = None if elector is not None else _Pinger(client)
    health = Health(
        max_api_silence=_env_float("TOLLGATE_LIVENESS_API_SECONDS", 60.0),
        max_loop_lag=_env_float("TOLLGATE_LIVENESS_LOOP_LAG_SECONDS", 10.0),
        last_contact=lambda: (elector or pinger).last_contact,  # type: ignore[union-attr]
        leading=lambda: elector.leading if elector is not None else True,
    )
    endpoints = Endpoints(health)
    await endpoints.start(args.liveness, args.metrics)
    if pinger is not None:
        endpoints.add_task(asyncio.create_task(pinger.run(), name="api-pinger"))
    try:
        if elector is not None and not await elector.acquire(stop):
            return 0  # stopped while standing by
        metrics.LEADER.set(1)
        kopf_stop = asyncio.Event()
        operator = asyncio.create_task(
            kopf.operator(
                clusterwide=not args.namespace,
                namespaces=args.namespace,
                standalone=True,
                stop_flag=kopf_stop,
            ),
            name="kopf",
        )
        health.operator_task = operator
        waits: set[asyncio.Future[Any]] = {operator, asyncio.ensure_future(stop.wait())}
        keeper = None
        if elector is not None:
            keeper = asyncio.create_task(elector.keep(stop), name="lease-renewal")
            waits.add(keeper)
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        # kopf installs its own SIGTERM/SIGINT handlers once it runs: a signal then ends
        # `operator` normally (a clean stop); an exception from it is a crash.
        lost = keeper is not None and keeper in done and not stop.is_set()
        crashed = False
        kopf_stop.set()
        health.operator_task = None
        try:
            await operator
        except Exception:
            logging.getLogger(__name__).exception("kopf stopped with an error")
            crashed = True
        for task in pending:
            task.cancel()
        metrics.LEADER.set(0)
        if elector is not None and not lost:
            await elector.release()  # only now that kopf has stopped: never two leaders
        return 1 if lost or crashed else 0
    finally:
        await endpoints.close()
        await client.close()


class _Pinger:
    """Without leader election nothing else talks to the API server on a schedule: a
    GET /version every few seconds keeps the liveness' API check meaningful."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.last_contact: float | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.client.version()
                self.last_contact = time.monotonic()
            except ApiError:
                pass
            await asyncio.sleep(5.0)


def _quiet_timers(record: logging.LogRecord) -> bool:
    """kopf logs every timer run and every watch-event handler ("Timer 'refresh'
    succeeded.", "Handler 'child_changed' succeeded."): a line per object per interval and
    per watch event, for nothing. Failures still show."""
    if not (record.name.startswith("kopf.objects") and record.levelno == logging.INFO):
        return True
    message = record.getMessage()
    return not (message.startswith(("Timer ", "Handler ")) and message.endswith(" succeeded."))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kubernetes_asyncio logs every request body at DEBUG; keep it quiet.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_timers)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
