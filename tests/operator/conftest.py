"""Fixtures: a fixed-up kmock API emulator per test, and the operator as a real process."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "chart"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from harness import Kube, Operator, install_operator_rbac  # noqa: E402
from k8s_emulator import EmulatorThread  # noqa: E402

# Namespaces every test cluster has (created up front, as on a real cluster).
NAMESPACES = ("default", "tollgate", "llm")
# The chart's operator RBAC the tests install by default: a Role in each namespace the
# tests use (the chart's namespaced mode, its default).
DEFAULT_RBAC = {"operator": {"watchNamespaces": ["tollgate", "llm"]}}


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[EmulatorThread]:
    """A fresh emulator; parametrize indirectly with {"service_monitor": True} to serve
    monitoring.coreos.com/v1 as if the Prometheus operator were installed."""
    options = getattr(request, "param", {}) or {}
    with EmulatorThread(**options) as emulator:
        emulator.create_namespaces(*NAMESPACES)
        yield emulator


@pytest.fixture
def kube(cluster: EmulatorThread) -> Kube:
    return Kube(cluster.url)


@pytest.fixture
def start_operator(
    cluster: EmulatorThread, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Operator]]:
    started: list[Operator] = []
    installed: dict[str, list[str]] = {}

    def start(
        rbac: dict[str, Any] | None = None, server: str | None = None, **env: str
    ) -> Operator:
        """The operator with the chart's RBAC for `rbac` values (default: namespaced,
        watching tollgate and llm) installed first."""
        values = rbac if rbac is not None else DEFAULT_RBAC
        key = repr(sorted(values.items()))
        if key not in installed:
            installed[key] = install_operator_rbac(Kube(cluster.url), values)
        operator = Operator(cluster, tmp_path, installed[key], server=server, **env)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for operator in started:
            sys.stderr.write(operator.output()[-20000:])
        for user, attrs in cluster.denials():
            sys.stderr.write(f"RBAC denied {user.name}: {attrs}\n")


@pytest.fixture
def operator(start_operator: Callable[..., Operator]) -> Operator:
    return start_operator()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
