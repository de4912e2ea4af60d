"""The simulator's own tests: real `tollgate-sim` processes on 127.0.0.1, real HTTP bytes.

`start(*flags)` starts one (the shared `make_sim` stops it); a failed test prints the
logs of the simulators it started."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import Sim


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, "report_" + report.when, report)


@pytest.fixture
def start(
    make_sim: Callable[..., Sim], request: pytest.FixtureRequest
) -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def run(*flags: str) -> Sim:
        started.append(make_sim(*flags))
        return started[-1]

    yield run
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for sim in started:
            print(f"--- tollgate-sim at {sim.url} ---\n{sim.output()}")
