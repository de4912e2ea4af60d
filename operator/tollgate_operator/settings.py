"""The operator's own knobs, read once from the environment.

The Helm chart sets the images; the intervals exist so tests (and impatient clusters) can
shorten them. Every value has a production default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GROUP = "tollgate.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = f"{GROUP}/finalizer"
MANAGED_BY = "tollgate-operator"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


@dataclass(frozen=True)
class OperatorSettings:
    gateway_image: str = "tollgate/gateway:0.1.0"
    exporter_image: str = "tollgate/gpu-exporter:0.1.0"
    # Status refresh (usage, readiness, expiry): a timer per object that writes only changes.
    status_interval: float = 30.0
    # Config Secret writes: wait this long for the burst to go quiet, but never longer than
    # `debounce_max` after the first change. Bounds revocation latency (see docs/operator.md).
    debounce: float = 0.3
    debounce_max: float = 1.0
    # Full recompute of every gateway config even without events (expiry, missed pokes).
    resync_interval: float = 60.0
    # How long a ServiceMonitor discovery answer is trusted.
    discovery_ttl: float = 300.0

    @classmethod
    def from_env(cls) -> OperatorSettings:
        return cls(
            gateway_image=os.environ.get("TOLLGATE_GATEWAY_IMAGE") or cls.gateway_image,
            exporter_image=os.environ.get("TOLLGATE_EXPORTER_IMAGE") or cls.exporter_image,
            status_interval=_float("TOLLGATE_STATUS_INTERVAL", cls.status_interval),
            debounce=_float("TOLLGATE_DEBOUNCE_SECONDS", cls.debounce),
            debounce_max=_float("TOLLGATE_DEBOUNCE_MAX_SECONDS", cls.debounce_max),
            resync_interval=_float("TOLLGATE_RESYNC_INTERVAL", cls.resync_interval),
            discovery_ttl=_float("TOLLGATE_DISCOVERY_TTL", cls.discovery_ttl),
        )


SETTINGS = OperatorSettings.from_env()
