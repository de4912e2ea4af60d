"""The operator's own Prometheus metrics (served on `--metrics`, its own port).

- `tollgate_operator_reconcile_total{kind,result}`: every converge pass of a parent's
  children (InferenceGateway, GPUExporter), every config-document sync (GatewayConfig) and
  every ApiKey reconcile; result `success` or `error`.
- `tollgate_operator_reconcile_duration_seconds{kind}`: how long each took.
- `tollgate_operator_pending{kind}`: objects whose converge loop has work it has not done
  yet (poked and not run, or last pass failed and waiting for its retry). kopf exposes no
  queue of its own; this is what the operator's loops know.
- `tollgate_operator_leader`: 1 on the replica holding the Lease, else 0.
- `tollgate_operator_api_contact_age_seconds`: seconds since the API server last answered
  (what the liveness probe judges).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "tollgate_operator_reconcile_total",
    "Reconcile passes by kind and result.",
    ["kind", "result"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "tollgate_operator_reconcile_duration_seconds",
    "Duration of reconcile passes.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
PENDING = Gauge(
    "tollgate_operator_pending",
    "Objects whose children or config are known to be out of date (work not done yet).",
    ["kind"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "tollgate_operator_leader",
    "1 when this replica holds the leader Lease and runs the controllers.",
    registry=REGISTRY,
)
API_AGE = Gauge(
    "tollgate_operator_api_contact_age_seconds",
    "Seconds since the API server last answered this replica.",
    registry=REGISTRY,
)

# kind -> object -> out of date (set by the converge loops).
_pending: dict[str, dict[str, bool]] = {}
KINDS = ("InferenceGateway", "GPUExporter", "GatewayConfig", "ApiKey")
for _kind in KINDS:
    RECONCILES.labels(_kind, "success")
    RECONCILES.labels(_kind, "error")
    DURATION.labels(_kind)


def _count(kind: str) -> Callable[[], float]:
    return lambda: float(sum(_pending.get(kind, {}).values()))


for _kind in KINDS:
    PENDING.labels(_kind).set_function(_count(_kind))


def set_pending(kind: str, what: str, pending: bool | None) -> None:
    """Mark `what` (an object) as out of date or not; None forgets it (object gone)."""
    objects = _pending.setdefault(kind, {})
    if pending is None:
        objects.pop(what, None)
    else:
        objects[what] = pending


@contextlib.contextmanager
def reconcile(kind: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit | KeyboardInterrupt) and not _cancelled(exc):
            RECONCILES.labels(kind, "error").inc()
            DURATION.labels(kind).observe(time.monotonic() - started)
        raise
    RECONCILES.labels(kind, "success").inc()
    DURATION.labels(kind).observe(time.monotonic() - started)


def _cancelled(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError)
