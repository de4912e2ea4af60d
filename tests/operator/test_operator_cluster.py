"""What only a real cluster can show (kind/e2e.sh runs these): CRD enforcement by the API
server, garbage collection of children, the operator's RBAC. Skipped without a kubeconfig
or kubectl; they expect the chart installed (operator running) in $TOLLGATE_NAMESPACE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KUBECONFIG = os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))
NS = os.environ.get("TOLLGATE_NAMESPACE", "tollgate")
OPERATOR_SA = os.environ.get(
    "TOLLGATE_OPERATOR_SA", f"system:serviceaccount:{NS}:tollgate-operator"
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not Path(KUBECONFIG).exists() or shutil.which("kubectl") is None,
        reason="needs a Kubernetes cluster (kubeconfig) and kubectl; run from kind/",
    ),
]


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", "-n", NS, *args], input=stdin, text=True, capture_output=True, check=check
    )


def test_api_server_rejects_bad_objects() -> None:
    bad = {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "bad-policy"},
        "spec": {"tokensPerDay": 0},
    }
    result = kubectl("apply", "-f", "-", stdin=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert "tokensPerDay" in result.stderr


def test_generated_key_secret_is_garbage_collected() -> None:
    key = {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "ApiKey",
        "metadata": {"name": "gc-probe"},
        "spec": {"gateway": "tollgate"},
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(key))
    deadline = time.monotonic() + 30
    while kubectl("get", "secret", "gc-probe-key", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the key Secret was not generated"
        time.sleep(1)
    kubectl("delete", "apikey", "gc-probe", "--wait=true", "--timeout=30s")
    deadline = time.monotonic() + 60
    while kubectl("get", "secret", "gc-probe-key", check=False).returncode == 0:
        assert time.monotonic() < deadline, "the key Secret outlived its ApiKey"
        time.sleep(1)


def test_operator_rbac_is_what_rbac_py_declares() -> None:
    from tollgate_operator import rbac

    for (group, resource), verbs in rbac.USED.items():
        target = f"{resource}.{group}" if group else resource
        for verb in verbs:
            result = kubectl("auth", "can-i", verb, target, "--as", OPERATOR_SA, check=False)
            assert result.stdout.strip() == "yes", (verb, target)
    result = kubectl("auth", "can-i", "delete", "secrets", "--as", OPERATOR_SA, check=False)
    assert result.stdout.strip() == "no"
