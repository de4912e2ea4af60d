"""Which pod a GPU's series name: the kubelet's allocation joined to NVML's identity.

Gauges (utilization, memory, processes) carry the pod labels when exactly one container holds
the GPU, so `avg by (namespace, pod)` works as with dcgm-exporter. Counters never do: an XID
or energy counter re-labelled to whoever holds the GPU now would appear as a new series under
the next pod (a false `increase() > 0`, a false alert). Counters stay on the GPU and are
joined to pods through `gpu_allocation_info`, the way kube-state-metrics does it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .podresources import index_key

Owner = tuple[str, str, str]  # namespace, pod, container
PodMap = Mapping[str, list[Owner]]


def gpu_owners(pods: PodMap, uuid: str, index: int) -> list[Owner]:
    """Containers holding the GPU, whether the device plugin named it by UUID or by index."""
    found = list(pods.get(uuid, [])) if uuid else []
    for owner in pods.get(index_key(index), []):
        if owner not in found:
            found.append(owner)
    return found


def mig_owners(pods: PodMap, gpu_uuid: str, labels: Mapping[str, str]) -> list[Owner]:
    """Containers holding a MIG instance, by MIG UUID or by the older GPU-x/gi/ci naming."""
    legacy = f"{gpu_uuid}/{labels['gpu_instance']}/{labels['compute_instance']}"
    return list(pods.get(labels["mig_uuid"]) or pods.get(legacy, []))


def owner_labels(owner: Owner) -> dict[str, str]:
    namespace, pod, container = owner
    return {"namespace": namespace, "pod": pod, "container": container}


def with_owner(labels: dict[str, str], owners: list[Owner]) -> dict[str, str]:
    """Pod labels on a GPU's own series only when exactly one container holds it; a shared
    (time-sliced) GPU is attributed through `gpu_allocation_info` instead, so sums over
    pods never double-count."""
    if len(owners) != 1:
        return labels
    return {**labels, **owner_labels(owners[0])}
