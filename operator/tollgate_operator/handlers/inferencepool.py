"""InferencePools and their pods: events that make a gateway resolve its pool again.

A gateway whose `spec.upstream.inferencePool` names a pool gets the pool's ready pods as
the config document's `upstreams` (pools.py, writer.py). These watches only say *when*:
a pool's event pokes the writers of the gateways naming it, a pod's event the writers whose
pool selected it or now selects it, and the writer reads the pool and its pods afresh, so
a pod becoming ready or going away reaches the document within the writer's debounce.

No index: kopf holds every handler until each index has its first listing, so an index
on pods would silently stall the whole operator (key revocation included) wherever pods or
InferencePools cannot be listed (RBAC not upgraded with the operator). Without one, the
writers keep reading, find the same 403, keep the upstreams last written and say so in
status (UpstreamResolved=False, Forbidden) while keys go on being served; once kopf has
spent its retries on the refused watch it stops, and the operator exits 1 (loud, as for any
kind whose RBAC is missing). Where the InferencePool CRD is not installed kopf watches
nothing of it (a warning at start) and the gateway says PoolKindNotServed.
"""

from __future__ import annotations

from typing import Any

import kopf

from ..client import INFERENCE_POOLS, PODS
from ..runtime import Runtime


@kopf.on.event(INFERENCE_POOLS.group, INFERENCE_POOLS.version, INFERENCE_POOLS.plural)
def pool_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """Listings too (type None): after a watch that had to list again, what changed in
    the gap is read; at start no writer has resolved yet, so nothing is poked."""
    if namespace is None:
        return
    runtime: Runtime = memo.runtime
    runtime.poke_pool(namespace, name)


@kopf.on.event(PODS.group, PODS.version, PODS.plural)
def pod_changed(body: kopf.Body, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    if namespace is None:
        return
    runtime: Runtime = memo.runtime
    labels = dict(body.get("metadata", {}).get("labels") or {})
    runtime.poke_pod(namespace, name, labels)
