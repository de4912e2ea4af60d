"""A PostgreSQL for the quota tests (see support/pg.py for how one is found), and a fresh
schema per test so no test sees another's rows.

Tests ask for `pg` before `make_gateway`, so their gateways stop (and flush) before the
schema is dropped."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from pg import TempPostgres, find_database
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


class PgSchema:
    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name

    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.url, "QUOTA_DB_SCHEMA": self.name}

    def query(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.url, server_settings={"search_path": self.name})
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def tokens_today(self, key_name: str) -> int:
        rows = self.query(
            "SELECT prompt_tokens + completion_tokens AS t FROM tollgate_usage"
            " WHERE key_name = $1 AND day = (now() AT TIME ZONE 'utc')::date",
            key_name,
        )
        return rows[0]["t"] if rows else 0

    def drop(self) -> None:
        self.query(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')


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
