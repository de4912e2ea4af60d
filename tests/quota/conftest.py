"""A fresh schema per test on the suite's PostgreSQL (`database_url`, tests/conftest.py), so
no test sees another's rows, and a cluster of a test's own for tests that stop it.

Tests ask for `pg` before `make_gateway`, so their gateways stop (and flush) before the
schema is dropped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from pg import PgSchema, TempPostgres
from servers import free_port


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
