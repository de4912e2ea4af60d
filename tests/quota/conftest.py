"""A PostgreSQL for the quota tests (see support/pg.py for how one is found), and a fresh
schema per test so no test sees another's rows.

Tests ask for `pg` before `make_gateway`, so their gateways stop (and flush) before the
schema is dropped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from pg import PgSchema, TempPostgres, find_database
from servers import free_port


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    found = find_database(free_port())
    if found is None:
        pytest.exit(
            "no PostgreSQL for the quota tests: set DATABASE_URL, run one on 127.0.0.1:5432,"
            " or install the server binaries (apt-get install postgresql)",
            returncode=2,
        )
    url, temp = found
    yield url
    if temp is not None:
        temp.remove()


@pytest.fixture
def pg(database_url: str) -> Iterator[PgSchema]:
    schema = PgSchema(database_url, f"t_{uuid.uuid4().hex[:12]}")
    yield schema
    schema.drop()


@pytest.fixture
def temp_pg() -> Iterator[TempPostgres]:
    """A cluster of the test's own, for tests that stop the database."""
    server = TempPostgres(free_port())
    server.start()
    yield server
    server.remove()
