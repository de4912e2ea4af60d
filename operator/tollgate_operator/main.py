"""`tollgate-operator`: run the kopf operator for the tollgate.dev resources.

Cluster-wide by default (the chart's ClusterRole); `--namespace` (repeatable) restricts it.
A liveness endpoint serves kopf's health at /healthz when `--liveness` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence

import kopf

from . import handlers  # noqa: F401  (registers the handlers)


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
        help="e.g. http://0.0.0.0:8081/healthz ($TOLLGATE_LIVENESS)",
    )
    p.add_argument("--log-level", default=os.environ.get("TOLLGATE_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await kopf.operator(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,
        liveness_endpoint=args.liveness or None,
        stop_flag=stop,
    )


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
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
