"""Smoke: what `helm install` would create, applied with the real kubectl into the API
emulator the operator tests use (tests/operator/k8s_emulator.py), then the real
`tollgate-operator` process reconciles the chart's default InferenceGateway into its
Deployment and config Secret. Then a newcomer's first steps from NOTES.txt (create an
ApiKey, read its generated key) are run as written, with bash and kubectl.

The emulator registers the CRDs from charts/tollgate/crds itself (as `helm install` would
install them first), so the rendered templates go in without --include-crds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from chart_support import CHART, NAMESPACE, RELEASE, helm, render_text, tool
from harness import Kube, Operator, wait_until
from k8s_emulator import EmulatorThread


@pytest.fixture
def cluster() -> Iterator[EmulatorThread]:
    with EmulatorThread() as emulator:
        emulator.create_namespaces(NAMESPACE)
        emulator.bind_anonymous_as_admin()  # kubectl: no token over plain HTTP
        yield emulator


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(tool("kubectl")), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def test_helm_template_applies_and_the_operator_reconciles_it(
    cluster: EmulatorThread, tmp_path: Path
) -> None:
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig")
    manifests = render_text(extra=("--skip-tests",))
    applied = kubectl(kubeconfig, "apply", "--validate=false", "-f", "-", stdin=manifests)
    for line in (
        f"role.rbac.authorization.k8s.io/{RELEASE}-operator created",
        f"networkpolicy.networking.k8s.io/{RELEASE}-postgres created",
        f"deployment.apps/{RELEASE}-operator created",
        f"statefulset.apps/{RELEASE}-postgres created",
        f"inferencegateway.tollgate.dev/{RELEASE} created",
        "quotapolicy.tollgate.dev/standard created",
    ):
        assert line in applied, applied

    kube = Kube(cluster.url)
    # As the chart's Deployment runs it: its ServiceAccount (authorized by the Role the
    # chart just applied), watching the release namespace, told to make the DB Secret.
    operator = Operator(
        cluster,
        tmp_path,
        [NAMESPACE],
        TOLLGATE_OPERATOR_NAMESPACE=NAMESPACE,
        TOLLGATE_POSTGRES_SECRET=f"{RELEASE}-postgres",
        TOLLGATE_POSTGRES_HOST=f"{RELEASE}-postgres.{NAMESPACE}.svc",
    )
    try:
        deployment = wait_until(
            lambda: kube.get("Deployment", NAMESPACE, f"{RELEASE}-gateway"),
            timeout=60,
            what="the gateway Deployment",
        )
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "tollgate/gateway:0.1.0"
        assert deployment["spec"]["replicas"] == 2
        env = {e["name"]: e for e in container["env"]}
        assert env["VLLM_URL"]["value"] == "http://vllm:8000"
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{RELEASE}-postgres",
            "key": "database-url",
        }
        # The operator generated the Postgres Secret (once) that the gateway will read.
        url = wait_until(
            lambda: kube.secret_data(NAMESPACE, f"{RELEASE}-postgres", "database-url"),
            what="the operator-generated Postgres Secret",
        )
        password = kube.secret_data(NAMESPACE, f"{RELEASE}-postgres", "password")
        assert url.startswith(f"postgresql://tollgate:{password}@")

        def config() -> dict | None:
            raw = kube.secret_data(NAMESPACE, f"{RELEASE}-gateway-config", "config.json")
            return json.loads(raw) if raw else None

        document = wait_until(config, timeout=30, what="the gateway config Secret")
        assert document["defaultPolicy"] == "standard"
        assert document["policies"]["standard"]["tokensPerDay"] == 2_000_000

        # NOTES.txt, steps 1 and 2, run as a newcomer would paste them.
        key = _run_notes_first_key(kubeconfig, tmp_path)
        assert key.startswith("sk-tg-")
        digest = hashlib.sha256(key.encode()).hexdigest()
        wait_until(
            lambda: digest in ((config() or {}).get("keys") or {}),
            timeout=30,
            what="the new key's hash in the gateway config",
        )
        assert operator.alive(), operator.output()[-5000:]
    except BaseException:
        print(operator.output()[-20000:])
        raise
    finally:
        operator.stop()


def _run_notes_first_key(kubeconfig: Path, tmp_path: Path) -> str:
    """Steps 1 and 2 of NOTES.txt with bash: kubectl apply of the ApiKey heredoc, then the
    key read into $TOLLGATE_KEY. Returns the key."""
    notes = helm(
        "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", values={}
    ).stdout.split("NOTES:", 1)[1]
    steps = notes[notes.index("1. Create") : notes.index("3. Call")]
    script = "\n".join(line for line in steps.splitlines() if not re.match(r"^\d\. ", line))
    # The emulator serves no /openapi, which `kubectl apply` downloads to validate: the
    # shim adds --validate=false to apply (a real API server validates; see kind/e2e.sh).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "kubectl"
    shim.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do [ "$a" = apply ] && set -- "$@" --validate=false && break; done\n'
        f'exec {tool("kubectl")} "$@"\n'
    )
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "KUBECONFIG": str(kubeconfig),
    }

    errors: list[str] = []

    def attempt() -> str | None:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script + '\nprintf "%s" "$TOLLGATE_KEY"'],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Until the operator has generated the Secret, step 2 fails: retry like a user.
        if result.returncode == 0 and result.stdout:
            return result.stdout.splitlines()[-1]
        errors.append(result.stderr)
        return None

    try:
        key = wait_until(attempt, timeout=30, what="NOTES.txt steps 1-2")
    except AssertionError as error:
        raise AssertionError(f"{error}\nscript:\n{script}\nlast error:\n{errors[-1:]}") from None
    assert base64.b64encode(key.encode())  # printable
    return key
