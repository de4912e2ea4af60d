"""RBAC as the API server evaluates it, over the Role/ClusterRole/(Cluster)RoleBinding
objects stored in the emulator: who a token is, and whether that user may do a verb on a
resource (by name, with resourceNames), in a namespace or cluster-wide.

Also the two checks a real API server makes on RBAC writes (escalation prevention: you may
only grant what you hold) and on owner references (OwnerReferencesPermissionEnforcement:
setting blockOwnerDeletion needs `update` on the owner's `finalizers` subresource).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
# (group, plural) -> {(namespace, name): object}, as the emulator stores them.
Store = Mapping[tuple[str, str], Mapping[tuple[str | None, str], Obj]]
RBAC = "rbac.authorization.k8s.io"


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()

    @property
    def superuser(self) -> bool:
        return "system:masters" in self.groups


def service_account(namespace: str, name: str) -> User:
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


@dataclass(frozen=True)
class Attributes:
    """One request, as the authorizer sees it."""

    verb: str
    group: str
    resource: str  # plural, with "/subresource" when there is one
    namespace: str | None
    name: str | None = None


@dataclass
class Authorizer:
    store: Store
    denials: list[tuple[User, Attributes]] = field(default_factory=list)

    def _bindings(self, user: User, namespace: str | None) -> Iterator[tuple[str | None, Obj]]:
        """(namespace the rules apply in, role) for every role bound to the user."""
        for binding in self.store.get((RBAC, "clusterrolebindings"), {}).values():
            if _subject_matches(binding, user):
                role = self.store.get((RBAC, "clusterroles"), {}).get(
                    (None, binding["roleRef"]["name"])
                )
                if role is not None:
                    yield None, role
        if namespace is None:
            return
        for (ns, _), binding in self.store.get((RBAC, "rolebindings"), {}).items():
            if ns != namespace or not _subject_matches(binding, user):
                continue
            ref = binding["roleRef"]
            if ref["kind"] == "ClusterRole":
                role = self.store.get((RBAC, "clusterroles"), {}).get((None, ref["name"]))
            else:
                role = self.store.get((RBAC, "roles"), {}).get((namespace, ref["name"]))
            if role is not None:
                yield namespace, role

    def allowed(self, user: User, attrs: Attributes) -> bool:
        if user.superuser:
            return True
        for _, role in self._bindings(user, attrs.namespace):
            if any(rule_allows(rule, attrs) for rule in role.get("rules") or []):
                return True
        return False

    def check(self, user: User, attrs: Attributes) -> bool:
        ok = self.allowed(user, attrs)
        if not ok:
            self.denials.append((user, attrs))
        return ok

    def covers(self, user: User, namespace: str | None, rules: Iterable[Obj]) -> list[str]:
        """Escalation prevention: the parts of `rules` the user does not hold."""
        missing = []
        for rule in rules:
            names = rule.get("resourceNames") or [None]
            for group in rule.get("apiGroups") or [""]:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        for name in names:
                            attrs = Attributes(verb, group, resource, namespace, name)
                            if not self.allowed(user, attrs):
                                missing.append(f"{verb} {group or 'core'}/{resource}")
        return missing


def _subject_matches(binding: Obj, user: User) -> bool:
    for subject in binding.get("subjects") or []:
        kind = subject.get("kind")
        if kind == "User" and subject.get("name") == user.name:
            return True
        if kind == "Group" and subject.get("name") in user.groups:
            return True
        if kind == "ServiceAccount":
            wanted = f"system:serviceaccount:{subject.get('namespace')}:{subject.get('name')}"
            if wanted == user.name:
                return True
    return False


def rule_allows(rule: Obj, attrs: Attributes) -> bool:
    def has(values: Iterable[str] | None, value: str) -> bool:
        values = list(values or [])
        return "*" in values or value in values

    if not has(rule.get("verbs"), attrs.verb):
        return False
    if not has(rule.get("apiGroups"), attrs.group):
        return False
    resource, _, sub = attrs.resource.partition("/")
    resources = list(rule.get("resources") or [])
    if not (
        "*" in resources
        or attrs.resource in resources
        or (sub and f"{resource}/*" in resources)
        or (sub and f"*/{sub}" in resources)
    ):
        return False
    names = rule.get("resourceNames") or []
    # resourceNames never match a request without a name (list, create, watch without a
    # metadata.name field selector): as on a real cluster.
    return not names or (attrs.name is not None and attrs.name in names)
