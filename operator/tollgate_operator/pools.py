"""An InferencePool as a gateway's replicas: the base URLs of its ready pods, as a pure
function of the pool and the pods its selector matches.

The Gateway API Inference Extension's InferencePool (inference.networking.k8s.io/v1)
names a set of model-server pods: a label selector (pods in the pool's namespace) and the
ports they serve on. tollgate picks replicas itself (upstream.py in the gateway), so only
the selector, the target ports and the app protocol are read; `endpointPickerRef` is
ignored. The result goes into the config document as `upstreams`, which the gateway swaps
in without a restart.

Fail-closed: whatever cannot be resolved (no pool, a pool that selects nothing or every
pod, a protocol the gateway cannot speak) is an empty list, which the gateway answers with
503 no_healthy_upstream. Traffic never goes anywhere the pool does not name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tollgate_contract.config import replica_url

# The protocols the gateway's upstream client speaks (HTTP/1.1 only: h1client.py).
SPOKEN = frozenset({"http"})
RESOLVED = "Resolved"

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PoolSpec:
    """What tollgate reads of an InferencePool."""

    name: str
    selector: Labels
    ports: tuple[int, ...]
    app_protocol: str = "http"

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PoolSpec:
        spec = body.get("spec") or {}
        labels = ((spec.get("selector") or {}).get("matchLabels")) or {}
        ports = {int(p["number"]) for p in spec.get("targetPorts") or [] if p.get("number")}
        return cls(
            name=body["metadata"]["name"],
            selector=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
            ports=tuple(sorted(ports)),
            app_protocol=spec.get("appProtocol") or "http",
        )


@dataclass(frozen=True)
class Resolution:
    """A pool's replicas as last resolved, and why there are (or are not) any.

    `selector` and `members` (the pods the selector matched, ready or not) are what the
    pod watch needs to tell whether a pod's event can change this resolution."""

    pool: str
    upstreams: tuple[str, ...]
    reason: str
    message: str
    selector: Labels = ()
    members: frozenset[str] = frozenset()

    @property
    def resolved(self) -> bool:
        return self.reason == RESOLVED

    def concerns(self, pod: str, labels: Mapping[str, str]) -> bool:
        """Whether an event of this pod may change the resolution: it was a member, or
        its labels now match the selector."""
        return pod in self.members or (bool(self.selector) and selects(self.selector, labels))


def selects(selector: Labels, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Serving traffic: Ready=True, an IP, not being deleted (a terminating pod may still
    report Ready for a moment; it is on its way out)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def resolve(
    name: str, pool: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]]
) -> Resolution:
    """The pool's upstreams: every ready pod it selects, on every target port, sorted and
    deduplicated. `pods` may hold more than the selector matches (they are filtered here)."""
    if pool is None:
        return missing(name)
    spec = PoolSpec.from_body(pool)
    if not spec.selector:
        return Resolution(
            name,
            (),
            "EmptySelector",
            f"InferencePool {name} selects no labels (that would be every pod in the "
            "namespace): no upstream, the gateway answers 503",
        )
    if spec.app_protocol not in SPOKEN:
        return Resolution(
            name,
            (),
            "UnsupportedAppProtocol",
            f"InferencePool {name} speaks {spec.app_protocol}; the gateway speaks HTTP/1.1 "
            "only: no upstream, the gateway answers 503",
            spec.selector,
        )
    members = [p for p in pods if selects(spec.selector, _labels(p))]
    ready = [p for p in members if pod_ready(p)]
    urls = {
        url
        for pod in ready
        for port in spec.ports
        if (url := replica_url((pod.get("status") or {})["podIP"], port)) is not None
    }
    names = frozenset(p["metadata"]["name"] for p in members)
    if not urls:
        return Resolution(
            name,
            (),
            "NoReadyPods",
            f"InferencePool {name} selects {len(members)} pod(s), none ready: the gateway "
            "answers 503 until one is",
            spec.selector,
            names,
        )
    return Resolution(
        name,
        tuple(sorted(urls)),
        RESOLVED,
        f"InferencePool {name}: {len(ready)} ready pod(s) of {len(members)}, "
        f"{len(urls)} endpoint(s)",
        spec.selector,
        names,
    )


def missing(name: str) -> Resolution:
    return Resolution(
        name, (), "PoolMissing", f"InferencePool {name} not found: the gateway answers 503"
    )


def not_served(name: str) -> Resolution:
    return Resolution(
        name,
        (),
        "PoolKindNotServed",
        "inferencepools.inference.networking.k8s.io is not served: install the Gateway API "
        f"Inference Extension CRDs, then restart the operator (InferencePool {name}; the "
        "gateway answers 503)",
    )


def unreadable(name: str, status: int, error: str, previous: Iterable[str]) -> Resolution:
    """The pool or its pods could not be read (RBAC, the API server): keep the replicas
    last written, never guess new ones; none at all when nothing was written yet."""
    return Resolution(
        name,
        tuple(previous),
        "Forbidden" if status == 403 else "PoolUnreadable",
        f"InferencePool {name} or its pods could not be read ({error}): the upstreams "
        "last written are kept",
    )


def _labels(pod: Mapping[str, Any]) -> Mapping[str, str]:
    labels: Mapping[str, str] = (pod.get("metadata") or {}).get("labels") or {}
    return labels
