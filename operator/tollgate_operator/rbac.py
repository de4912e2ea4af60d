"""Exactly the Kubernetes API access the operator needs: the chart's ClusterRole.

`USED` is what the operator (kopf included) calls; tests/operator/test_rbac.py derives the
same set from the API emulator's request log and fails when they drift. `GRANT_ONLY` is
access the operator never uses itself but must hold because the API server only lets it
create a Role granting what it has (RBAC escalation prevention): each gateway's Role lets
its pods get/list/watch their one config Secret.

Discovery (`/api`, `/apis/...`) is allowed to every authenticated user by the default
`system:discovery` role and needs no rule here.
"""

from __future__ import annotations

from typing import Any

# (apiGroup, resource) -> verbs
USED: dict[tuple[str, str], frozenset[str]] = {
    # kopf: list/watch the custom resources, patch finalizers and its annotations.
    # The operator: get them (status refresh), patch their status.
    ("tollgate.dev", "apikeys"): frozenset({"get", "list", "watch", "patch"}),
    ("tollgate.dev", "quotapolicies"): frozenset({"get", "list", "watch", "patch"}),
    ("tollgate.dev", "inferencegateways"): frozenset({"get", "list", "watch", "patch"}),
    ("tollgate.dev", "gpuexporters"): frozenset({"get", "list", "watch", "patch"}),
    ("tollgate.dev", "apikeys/status"): frozenset({"patch"}),
    ("tollgate.dev", "quotapolicies/status"): frozenset({"patch"}),
    ("tollgate.dev", "inferencegateways/status"): frozenset({"patch"}),
    ("tollgate.dev", "gpuexporters/status"): frozenset({"patch"}),
    # Key Secrets (read users', create and rotate generated ones), config Secrets,
    # and the DATABASE_URL Secret for usage.
    ("", "secrets"): frozenset({"get", "create", "patch"}),
    ("", "services"): frozenset({"get", "create", "patch"}),
    ("", "serviceaccounts"): frozenset({"get", "create", "patch"}),
    ("", "events"): frozenset({"create"}),  # kopf.event / kopf.warn and handler failures
    ("apps", "deployments"): frozenset({"get", "create", "patch"}),
    ("apps", "daemonsets"): frozenset({"get", "create", "patch"}),
    ("policy", "poddisruptionbudgets"): frozenset({"get", "create", "patch", "delete"}),
    ("rbac.authorization.k8s.io", "roles"): frozenset({"get", "create", "patch"}),
    ("rbac.authorization.k8s.io", "rolebindings"): frozenset({"get", "create", "patch"}),
    ("monitoring.coreos.com", "servicemonitors"): frozenset({"get", "create", "patch", "delete"}),
}

GRANT_ONLY: dict[tuple[str, str], frozenset[str]] = {
    ("", "secrets"): frozenset({"list", "watch"}),
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
