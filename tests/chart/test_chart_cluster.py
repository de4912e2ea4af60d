"""What only a real cluster shows about the chart (kind/e2e.sh runs these after installing
it): the pods really run under the restricted settings, and the API server grants the
operator exactly rbac.py's set. Skipped without a kubeconfig or kubectl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tollgate_operator import rbac

KUBECONFIG = os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))
NS = os.environ.get("TOLLGATE_NAMESPACE", "tollgate")
RELEASE = "tollgate"
OPERATOR_SA = f"system:serviceaccount:{NS}:{RELEASE}-operator"
# Granted to every authenticated user by the default roles, not by the chart.
DEFAULT_GRANTS = {
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
    "selfsubjectreviews.authentication.k8s.io",
}

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not Path(KUBECONFIG).exists() or shutil.which("kubectl") is None,
        reason="needs a Kubernetes cluster (kubeconfig) and kubectl; run kind/e2e.sh",
    ),
]


def kubectl(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        ["kubectl", "-n", NS, *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_release_pods_are_ready_and_restricted() -> None:
    pods = json.loads(
        kubectl("get", "pods", "-l", "app.kubernetes.io/part-of=tollgate", "-o", "json")
    )
    running = [p for p in pods["items"] if p["status"].get("phase") == "Running"]
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in running}
    assert {"operator", "database", "gateway"} <= components, components
    for pod in running:
        name = pod["metadata"]["name"]
        statuses = pod["status"]["containerStatuses"]
        assert all(s["ready"] for s in statuses), name
        for container in pod["spec"]["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
    operator = next(
        p
        for p in running
        if p["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    )
    assert operator["status"]["containerStatuses"][0]["restartCount"] == 0


@pytest.mark.parametrize(
    "workload", [f"deployment/{RELEASE}-operator", f"deployment/{RELEASE}-gateway"]
)
def test_containers_run_as_non_root_on_a_read_only_root(workload: str) -> None:
    assert kubectl("exec", workload, "--", "id", "-u").strip() == "65532"
    denied = subprocess.run(
        ["kubectl", "-n", NS, "exec", workload, "--", "touch", "/probe"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_api_server_grants_the_operator_exactly_rbac_py() -> None:
    listing = kubectl("auth", "can-i", "--list", "--as", OPERATOR_SA)
    granted: dict[str, set[str]] = {}
    for line in listing.splitlines()[1:]:
        columns = line.split()
        if not columns or columns[0].startswith("/") or columns[0].startswith("["):
            continue  # non-resource URLs (discovery)
        resource = columns[0]
        verbs = line[line.rindex("[") + 1 : line.rindex("]")].split()
        granted.setdefault(resource, set()).update(verbs)
    expected: dict[str, set[str]] = {}
    for table in (rbac.USED, rbac.GRANT_ONLY):
        for (group, resource), verbs in table.items():
            name = f"{resource.split('/')[0]}.{group}" if group else resource.split("/")[0]
            if "/" in resource:
                name += "/" + resource.split("/", 1)[1]
            expected.setdefault(name, set()).update(verbs)
    for resource in DEFAULT_GRANTS:
        granted.pop(resource, None)
    assert granted == expected
