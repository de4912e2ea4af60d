"""Fixtures: a fixed-up kmock API emulator per test, and the operator as a real process."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Kube, Operator
from k8s_emulator import EmulatorThread


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[EmulatorThread]:
    """A fresh emulator; parametrize indirectly with {"service_monitor": True} to serve
    monitoring.coreos.com/v1 as if the Prometheus operator were installed."""
    options = getattr(request, "param", {}) or {}
    with EmulatorThread(**options) as emulator:
        yield emulator


@pytest.fixture
def kube(cluster: EmulatorThread) -> Kube:
    return Kube(cluster.url)


@pytest.fixture
def start_operator(
    cluster: EmulatorThread, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Operator]]:
    started: list[Operator] = []

    def start(**env: str) -> Operator:
        operator = Operator(cluster, tmp_path, **env)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for operator in started:
            sys.stderr.write(operator.output()[-20000:])


@pytest.fixture
def operator(start_operator: Callable[..., Operator]) -> Operator:
    return start_operator()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
