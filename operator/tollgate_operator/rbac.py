"""Exactly the Kubernetes API access the operator needs: the chart's ClusterRole.

`USED` is what the operator (kopf included) calls; tests/operator/test_operator_rbac.py
derives the same set from the API emulator's request log and fails when they drift, and the
emulator enforces the chart's rendering of it. `GRANT_ONLY` is access the operator never
calls but the API server checks on its behalf (owner-reference permission enforcement).
Each gateway's Role (get/watch on its one config Secret) is covered by USED's secrets
verbs, as RBAC escalation prevention demands.

Discovery (`/api`, `/apis/...`) is allowed to every authenticated user by the default
`system:discovery` role and needs no rule here.
"""

from __future__ import annotations

from typing import Any

# (apiGroup, resource) -> verbs
USED: dict[tuple[str, str], frozenset[str]] = {
    # kopf: list/watch the custom resources, patch its annotations (ApiKey handler
    # progress). The operator: get them (status), patch their status.
    ("tollgate.dev", "apikeys"): frozenset({"get", "list", "watch", "patch"}),
    ("tollgate.dev", "quotapolicies"): frozenset({"list", "watch"}),  # status: kopf's body
    ("tollgate.dev", "inferencegateways"): frozenset({"get", "list", "watch"}),
    ("tollgate.dev", "gpuexporters"): frozenset({"get", "list", "watch"}),
    ("tollgate.dev", "apikeys/status"): frozenset({"patch"}),
    ("tollgate.dev", "quotapolicies/status"): frozenset({"patch"}),
    ("tollgate.dev", "inferencegateways/status"): frozenset({"patch"}),
    ("tollgate.dev", "gpuexporters/status"): frozenset({"patch"}),
    # Key Secrets (read users', create and rotate generated ones), config Secrets, the
    # DATABASE_URL Secret for usage; list/watch: the operator's children are watched so
    # that a child deleted or edited by hand is restored within seconds.
    ("", "secrets"): frozenset({"get", "list", "watch", "create", "patch"}),
    ("", "services"): frozenset({"get", "list", "watch", "create", "patch"}),
    ("", "serviceaccounts"): frozenset({"get", "list", "watch", "create", "patch"}),
    ("", "events"): frozenset({"create"}),  # kopf.event / kopf.warn and handler failures
    ("apps", "deployments"): frozenset({"get", "list", "watch", "create", "patch"}),
    ("apps", "daemonsets"): frozenset({"get", "list", "watch", "create", "patch"}),
    ("policy", "poddisruptionbudgets"): frozenset(
        {"get", "list", "watch", "create", "patch", "delete"}
    ),
    ("networking.k8s.io", "networkpolicies"): frozenset(
        {"get", "list", "watch", "create", "patch", "delete"}
    ),
    ("rbac.authorization.k8s.io", "roles"): frozenset({"get", "list", "watch", "create", "patch"}),
    ("rbac.authorization.k8s.io", "rolebindings"): frozenset(
        {"get", "list", "watch", "create", "patch"}
    ),
    ("monitoring.coreos.com", "servicemonitors"): frozenset({"get", "create", "patch", "delete"}),
    # A gateway whose upstream is an InferencePool: the writer GETs the pool and lists its
    # pods by label selector; kopf lists and watches both (pokes). No get on pods: never
    # read one by name.
    ("inference.networking.k8s.io", "inferencepools"): frozenset({"get", "list", "watch"}),
    ("", "pods"): frozenset({"list", "watch"}),
}

# Leader election (leader.py): the one Lease, in the operator's own namespace only (a Role
# there, whatever the watch scope). get/update are limited to the Lease by name;
# create cannot be (the name is not part of a create's authorization).
LEASE_RESOURCE = ("coordination.k8s.io", "leases")
LEADER_ELECTION_BY_NAME = frozenset({"get", "update"})
LEADER_ELECTION_CREATE = frozenset({"create"})


def leader_election_rules(lease_name: str) -> list[dict[str, Any]]:
    group, resource = LEASE_RESOURCE
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(LEADER_ELECTION_CREATE)},
        {
            "apiGroups": [group],
            "resources": [resource],
            "resourceNames": [lease_name],
            "verbs": sorted(LEADER_ELECTION_BY_NAME),
        },
    ]


GRANT_ONLY: dict[tuple[str, str], frozenset[str]] = {
    # Never called, but checked by the API server: children carry owner references with
    # blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission plugin
    # (on by default on OpenShift) allows only to who may update the owner's finalizers.
    ("tollgate.dev", "inferencegateways/finalizers"): frozenset({"update"}),
    ("tollgate.dev", "gpuexporters/finalizers"): frozenset({"update"}),
    ("tollgate.dev", "apikeys/finalizers"): frozenset({"update"}),
}


def cluster_role_rules() -> list[dict[str, Any]]:
    """USED + GRANT_ONLY as ClusterRole rules, one rule per (group, resource)."""
    merged: dict[tuple[str, str], set[str]] = {}
    for table in (USED, GRANT_ONLY):
        for key, verbs in table.items():
            merged.setdefault(key, set()).update(verbs)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
        for (group, resource), verbs in sorted(merged.items())
    ]
