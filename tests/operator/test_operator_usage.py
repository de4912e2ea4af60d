"""Usage for ApiKey status, read from a real Postgres (the suite's `database_url`) in the
table the contract defines.

Each test creates its own schema and drops it, so runs never see each other's rows; the
schema reaches asyncpg (and the operator) through the DSN's search_path option.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import secrets
from collections.abc import Iterator

import asyncpg
import pytest
from harness import Kube, Operator, wait_until
from test_operator_reconcile import NS, apikey, gateway

from tollgate_contract.usage import MIGRATIONS
from tollgate_operator.usage import DayUsage, UsageReader, usage_status


@pytest.fixture
def dsn(database_url: str) -> Iterator[str]:
    schema = f"tollgate_op_{secrets.token_hex(4)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    tables = "".join(MIGRATIONS)
    asyncio.run(run(f"CREATE SCHEMA {schema}; SET search_path TO {schema}; {tables}"))
    separator = "&" if "?" in database_url else "?"
    yield f"{database_url}{separator}options=-csearch_path%3D{schema}"
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

    async def scenario() -> DayUsage:
        await _insert(
            dsn, [("a", today, 10, 5, 2), ("a", yesterday, 99, 99, 9), ("b", today, 1, 1, 1)]
        )
        reader = UsageReader()
        try:
            return await reader.today(dsn, ["a", "c"])
        finally:
            await reader.close()

    result = asyncio.run(scenario())
    usage = result.keys
    assert usage["a"].tokens == 15 and usage["a"].requests == 2
    assert usage_status(result.day, usage["a"])["day"] == today.isoformat()
    assert usage["c"].tokens == 0  # no row yet: zero, not missing
    assert "b" not in usage


def test_reader_without_table_reads_zero(database_url: str) -> None:
    schema = f"tollgate_empty_{secrets.token_hex(4)}"
    separator = "&" if "?" in database_url else "?"

    async def scenario() -> DayUsage:
        conn = await asyncpg.connect(database_url)
        await conn.execute(f"CREATE SCHEMA {schema}")
        reader = UsageReader()
        try:
            dsn = f"{database_url}{separator}options=-csearch_path%3D{schema}"
            return await reader.today(dsn, ["a"])
        finally:
            await reader.close()
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()

    assert asyncio.run(scenario()).keys["a"].tokens == 0


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
