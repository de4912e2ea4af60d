"""The operator's RBAC in the chart is exactly what it uses: operator/tollgate_operator/rbac.py
(USED, which tests/operator checks against the emulator's request log, plus GRANT_ONLY,
needed to create the gateways' Roles). Not one verb more, not one less, in both the
cluster-wide (ClusterRole) and the namespaced (Role per watched namespace) forms."""

from __future__ import annotations

import pytest
from chart_support import NAMESPACE, RELEASE, Manifest, of_kind, one, render

from tollgate_operator import rbac

Triple = tuple[str, str, str]


def _triples(rules: list[Manifest]) -> set[Triple]:
    found = set()
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/URLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    found.add((group, resource, verb))
    return found


def _expected() -> set[Triple]:
    return {
        (group, resource, verb)
        for table in (rbac.USED, rbac.GRANT_ONLY)
        for (group, resource), verbs in table.items()
        for verb in verbs
    }


def _operator_cluster_roles(docs: list[Manifest]) -> list[Manifest]:
    """ClusterRoles but the aggregated view/edit ones (which grant users, not the operator)."""
    return [
        r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"] == f"{RELEASE}-operator"
    ]


def _operator_roles(docs: list[Manifest]) -> list[Manifest]:
    """Roles but the leader-election one (checked on its own below)."""
    return [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == f"{RELEASE}-operator"]


def _operator_bindings(docs: list[Manifest]) -> list[Manifest]:
    return [
        b for b in of_kind(docs, "RoleBinding") if b["metadata"]["name"] == f"{RELEASE}-operator"
    ]


def test_default_is_the_release_namespace_only() -> None:
    docs = render()
    assert not _operator_cluster_roles(docs) and not of_kind(docs, "ClusterRoleBinding")
    (role,) = _operator_roles(docs)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _triples(role["rules"]) == _expected()
    operator = one(docs, "Deployment", f"{RELEASE}-operator")
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TOLLGATE_NAMESPACES"] == NAMESPACE


def test_cluster_role_is_exactly_rbac_py() -> None:
    docs = render({"operator": {"clusterWide": True}})
    (role,) = _operator_cluster_roles(docs)
    assert _triples(role["rules"]) == _expected()
    # Same shape as cluster_role_rules(): one rule per (group, resource), verbs sorted.
    normalise = sorted((r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in role["rules"])
    assert normalise == sorted(
        (r["apiGroups"], r["resources"], r["verbs"]) for r in rbac.cluster_role_rules()
    )
    assert not _operator_roles(docs), "the chart grants nothing else"


def test_aggregated_view_and_edit_roles() -> None:
    docs = render()
    roles = {r["metadata"]["name"]: r for r in of_kind(docs, "ClusterRole")}
    view, edit = roles[f"{RELEASE}-operator-view"], roles[f"{RELEASE}-operator-edit"]
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    kinds = {"apikeys", "quotapolicies", "inferencegateways", "gpuexporters"}
    assert {r for g, r, v in _triples(view["rules"])} == kinds
    assert {v for g, r, v in _triples(view["rules"])} == {"get", "list", "watch"}
    assert "delete" in {v for g, r, v in _triples(edit["rules"])}
    assert not of_kind(render({"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole")


def test_nothing_is_wildcarded_or_escalating() -> None:
    rules = _operator_roles(render())[0]["rules"]
    for group, resource, verb in _expected() | _triples(rules):
        assert "*" not in (group, resource, verb)
        assert verb not in ("escalate", "bind", "impersonate", "deletecollection")
        # update only where owner-reference enforcement checks it: <kind>/finalizers.
        assert verb != "update" or resource.endswith("/finalizers"), (resource, verb)
    secrets = {v for g, r, v in _triples(rules) if r == "secrets"}
    assert "delete" not in secrets and "update" not in secrets


def test_binding_is_the_operator_service_account() -> None:
    docs = render({"operator": {"clusterWide": True}})
    binding = one(docs, "ClusterRoleBinding")
    account = one(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": _operator_cluster_roles(docs)[0]["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    operator = one(docs, "Deployment", f"{RELEASE}-operator")
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    # The name tests/operator/test_operator_cluster.py checks on a real cluster.
    assert account["metadata"]["name"] == "tollgate-operator"


@pytest.mark.parametrize("namespaces", [[NAMESPACE], [NAMESPACE, "llm", "staging"]])
def test_namespaced_roles_are_exactly_rbac_py(namespaces: list[str]) -> None:
    docs = render({"operator": {"watchNamespaces": namespaces}})
    roles = {r["metadata"]["namespace"]: r for r in _operator_roles(docs)}
    bindings = {b["metadata"]["namespace"]: b for b in _operator_bindings(docs)}
    assert set(roles) == set(bindings) == set(namespaces)
    for namespace, role in roles.items():
        assert _triples(role["rules"]) == _expected(), namespace
        assert bindings[namespace]["roleRef"]["kind"] == "Role"
        assert bindings[namespace]["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}-operator", "namespace": NAMESPACE}
        ]
    assert not _operator_cluster_roles(docs) and not of_kind(docs, "ClusterRoleBinding")


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"operator": {"clusterWide": True}},
        {"operator": {"watchNamespaces": [NAMESPACE, "llm"]}},
    ],
)
def test_leader_election_role_is_the_one_lease_in_the_release_namespace(
    values: dict[str, object],
) -> None:
    """Whatever the watch scope: a Role in the release namespace, create on leases (which
    cannot be limited by name) and get/update on the operator's Lease only."""
    docs = render(values)
    name = f"{RELEASE}-operator-leader-election"
    role = one(docs, "Role", name)
    binding = one(docs, "RoleBinding", name)
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == rbac.leader_election_rules(f"{RELEASE}-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": name,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-operator", "namespace": NAMESPACE}
    ]
    operator = one(docs, "Deployment", f"{RELEASE}-operator")
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TOLLGATE_LEASE_NAME"] == f"{RELEASE}-operator"
