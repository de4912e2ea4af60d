"""Events of the objects the operator made: a child changed or went away, so its parent
converges again (within seconds, not at the next resync).

Only children carrying the operator's managed-by label are looked at, and only their owner
references are read. The config Secret belongs to the gateway's ConfigWriter, which is
told to forget what it believes the Secret holds and to check again.
"""

from __future__ import annotations

from typing import Any

import kopf

from .. import children
from ..reconcile import plain
from ..runtime import GatewayKey, Runtime
from ..settings import MANAGED_BY

_MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
# (group, version, plural) of every child kind but ServiceMonitor (an optional CRD: a
# watch on it would fail where it is not installed; it is restored on the next spec change).
CHILD_KINDS = [
    ("", "v1", "serviceaccounts"),
    ("", "v1", "services"),
    ("", "v1", "secrets"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "daemonsets"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
]


def child_changed(
    body: kopf.Body,
    type: str | None,
    memo: Any,
    namespace: str | None,
    name: str,
    resource: kopf.Resource,
    **_: Any,
) -> None:
    if namespace is None:
        return
    runtime: Runtime = memo.runtime
    plural = resource.plural
    if plural in ("deployments", "daemonsets"):  # their status feeds the parents' status
        obj = None if type == "DELETED" else plain(body)
        runtime.observe_workload(plural, obj, namespace, name)
    if type is None:  # the initial listing: parents converge at start anyway
        return
    refs = body.get("metadata", {}).get("ownerReferences") or []
    runtime.poke_owners(ref.get("uid", "") for ref in refs)
    for ref in refs:
        if ref.get("kind") == "InferenceGateway" and name == children.config_secret_name(
            ref.get("name", "")
        ):
            writer = runtime.writers.get(GatewayKey(namespace, ref["name"]))
            if writer is not None:
                writer.observe(None if type == "DELETED" else plain(body))


for _group, _version, _plural in CHILD_KINDS:
    kopf.on.event(_group, _version, _plural, labels=_MANAGED)(child_changed)
