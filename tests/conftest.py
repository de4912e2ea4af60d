"""Fixtures for every suite: the PostgreSQL the quota and operator tests use (found, or
started and removed: support/pg.py); for the suites that run the gateway, one simulator
and one gateway shared by the tests that only send traffic, and factories for tests that
need their own (faults, drain, limits, other settings). The processes themselves are in
support/servers.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from pg import find_database
from servers import KEY_A, Gateway, Sim, free_port


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    found = find_database(free_port())
    if found is None:
        pytest.exit(
            "no PostgreSQL for the tests: set DATABASE_URL, run one on 127.0.0.1:5432,"
            " or install the server binaries (apt-get install postgresql)",
            returncode=2,
        )
    url, temp = found
    yield url
    if temp is not None:
        temp.remove()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def sim(logs_dir: Path) -> Iterator[Sim]:
    server = Sim(logs_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(logs_dir: Path, sim: Sim) -> Iterator[Gateway]:
    server = Gateway(logs_dir, sim.url)
    yield server
    server.stop()


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY_A, max_retries=0)


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def make(*args: str, port: int | None = None, host: str = "127.0.0.1") -> Sim:
        started.append(Sim(tmp_path, *args, port=port, host=host))
        return started[-1]

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(upstream: str, **env: str) -> Gateway:
        started.append(Gateway(tmp_path, upstream, env))
        return started[-1]

    yield make
    for server in started:
        server.stop()
