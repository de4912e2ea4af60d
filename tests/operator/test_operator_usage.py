"""Usage for ApiKey status, read from the real Postgres (127.0.0.1:5432, trust auth).

Each test creates its own schema and drops it, so runs never see each other's rows; the
schema reaches asyncpg (and the operator) through the DSN's search_path option.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import secrets
import socket
from collections.abc import Iterator

import asyncpg
import pytest
from harness import Kube, Operator, wait_until
from test_operator_reconcile import NS, apikey, gateway

from tollgate_operator.usage import UsageReader

BASE_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TABLE = """
CREATE TABLE tollgate_usage (
    key_name text NOT NULL, day date NOT NULL,
    prompt_tokens bigint NOT NULL DEFAULT 0, completion_tokens bigint NOT NULL DEFAULT 0,
    requests bigint NOT NULL DEFAULT 0, PRIMARY KEY (key_name, day))
"""


def _postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _postgres_up(), reason="no PostgreSQL on 127.0.0.1:5432")


@pytest.fixture
def dsn() -> Iterator[str]:
    schema = f"tollgate_op_{secrets.token_hex(4)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(BASE_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE SCHEMA {schema}; SET search_path TO {schema}; {TABLE}"))
    yield f"{BASE_DSN}?options=-csearch_path%3D{schema}"
    asyncio.run(run(f"DROP SCHEMA {schema} CASCADE"))


async def _insert(dsn: str, rows: list[tuple[str, datetime.date, int, int, int]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO tollgate_usage VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_name, day)"
            " DO UPDATE SET prompt_tokens = EXCLUDED.prompt_tokens,"
            " completion_tokens = EXCLUDED.completion_tokens, requests = EXCLUDED.requests",
            rows,
        )
    finally:
        await conn.close()


def test_reader_sums_today_only(dsn: str) -> None:
    today = datetime.datetime.now(datetime.UTC).date()
    yesterday = today - datetime.timedelta(days=1)

    async def scenario() -> dict:
        await _insert(
            dsn, [("a", today, 10, 5, 2), ("a", yesterday, 99, 99, 9), ("b", today, 1, 1, 1)]
        )
        reader = UsageReader()
        try:
            return await reader.today(dsn, ["a", "c"])
        finally:
            await reader.close()

    usage = asyncio.run(scenario())
    assert usage["a"].tokens == 15 and usage["a"].requests == 2
    assert usage["a"].as_status()["day"] == today.isoformat()
    assert usage["c"].tokens == 0  # no row yet: zero, not missing
    assert "b" not in usage


def test_reader_without_table_reads_zero() -> None:
    schema = f"tollgate_empty_{secrets.token_hex(4)}"

    async def scenario() -> dict:
        conn = await asyncpg.connect(BASE_DSN)
        await conn.execute(f"CREATE SCHEMA {schema}")
        reader = UsageReader()
        try:
            return await reader.today(f"{BASE_DSN}?options=-csearch_path%3D{schema}", ["a"])
        finally:
            await reader.close()
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()

    assert asyncio.run(scenario())["a"].tokens == 0


def test_apikey_status_shows_tokens_today(kube: Kube, operator: Operator, dsn: str) -> None:
    today = datetime.datetime.now(datetime.UTC).date()
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": NS},
            "data": {"database-url": base64.b64encode(dsn.encode()).decode()},
        }
    )
    kube.apply(gateway(database={"urlSecretRef": {"name": "db"}}))
    kube.apply(apikey("team-a"))
    wait_until(lambda: (kube.get("ApiKey", NS, "team-a").get("status") or {}).get("usage"))
    asyncio.run(_insert(dsn, [("team-a", today, 120, 30, 3)]))

    def usage() -> dict | None:
        found = (kube.get("ApiKey", NS, "team-a").get("status") or {}).get("usage") or {}
        return found if found.get("tokensToday") == 150 else None

    found = wait_until(usage, timeout=10)
    assert found == {
        "day": today.isoformat(),
        "tokensToday": 150,
        "promptTokens": 120,
        "completionTokens": 30,
        "requests": 3,
    }


def test_no_database_means_no_usage(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway())
    kube.apply(apikey("team-a"))
    # Ready once the config is written (the first status may still say Pending).
    status = wait_until(
        lambda: (
            (st := kube.get("ApiKey", NS, "team-a").get("status") or {}).get("conditions")
            and st["conditions"][0]["status"] == "True"
            and st
        )
    )
    assert "usage" not in status
