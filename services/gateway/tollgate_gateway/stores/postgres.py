"""The shared quota store: Postgres through asyncpg, for several gateway replicas.

A flush is ONE statement, so it is atomic without an explicit transaction: a guard row
`(replica_id, seq)` admits each batch once, the day and minute counters are upserted with
`unnest` arrays (any number of keys, one round trip), and the same statement returns the
global totals (the upserted rows, plus the other windows the replica tracks). Rows are
sorted by key so concurrent flushes from several replicas lock them in the same order.

Connection budget: a pool of at most 2 connections per replica (the flush timer and
`/v1/usage`); the schema is created and migrated at start under an advisory lock, so
replicas starting together do not race.
"""

from __future__ import annotations

import datetime as dt

import asyncpg

from tollgate_contract.usage import DAY_USAGE_QUERY, MIGRATIONS, Usage
from tollgate_gateway.stores import Batch, DayWindow, MinuteWindow, Totals

_LOCK_ID = 0x7011_6A7E  # pg_advisory_xact_lock id for schema changes

_FLUSH = """
WITH guard AS (
    INSERT INTO tollgate_flushes AS f (replica_id, seq) VALUES ($1, $2)
    ON CONFLICT (replica_id) DO UPDATE SET seq = excluded.seq, updated_at = now()
        WHERE f.seq < excluded.seq
    RETURNING 1
), day_up AS (
    INSERT INTO tollgate_usage AS u (key_name, day, prompt_tokens, completion_tokens, requests)
    SELECT * FROM unnest($3::text[], $4::date[], $5::bigint[], $6::bigint[], $7::bigint[])
    WHERE EXISTS (SELECT 1 FROM guard)
    ON CONFLICT (key_name, day) DO UPDATE SET
        prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = u.completion_tokens + excluded.completion_tokens,
        requests = u.requests + excluded.requests
    RETURNING key_name, day, prompt_tokens, completion_tokens, requests
), minute_up AS (
    INSERT INTO tollgate_usage_minute AS m (key_name, minute, tokens, requests)
    SELECT * FROM unnest($8::text[], $9::bigint[], $10::bigint[], $11::bigint[])
    WHERE EXISTS (SELECT 1 FROM guard)
    ON CONFLICT (key_name, minute) DO UPDATE SET
        tokens = m.tokens + excluded.tokens, requests = m.requests + excluded.requests
    RETURNING key_name, minute, tokens, requests
)
SELECT 'd' AS kind, key_name, day, 0::bigint AS minute, prompt_tokens, completion_tokens, requests
    FROM day_up
UNION ALL
SELECT 'd', u.key_name, u.day, 0, u.prompt_tokens, u.completion_tokens, u.requests
    FROM tollgate_usage u JOIN unnest($12::text[], $13::date[]) AS r(key_name, day)
        USING (key_name, day)
    WHERE NOT EXISTS (SELECT 1 FROM day_up x WHERE x.key_name = u.key_name AND x.day = u.day)
UNION ALL
SELECT 'm', key_name, NULL, minute, tokens, 0, requests FROM minute_up
UNION ALL
SELECT 'r', NULL, NULL, 0, 0, 0, count(*) FROM tollgate_flushes
    WHERE replica_id <> $1 AND updated_at > now() - $16 * interval '1 second'
UNION ALL
SELECT 'm', m.key_name, NULL, m.minute, m.tokens, 0, m.requests
    FROM tollgate_usage_minute m JOIN unnest($14::text[], $15::bigint[]) AS r(key_name, minute)
        USING (key_name, minute)
    WHERE NOT EXISTS (
        SELECT 1 FROM minute_up x WHERE x.key_name = m.key_name AND x.minute = m.minute)
"""
_CLEANUP = """
DELETE FROM tollgate_usage_minute WHERE minute < $1;
"""
_CLEANUP_FLUSHES = "DELETE FROM tollgate_flushes WHERE updated_at < now() - interval '2 days'"


class PostgresStore:
    shared = True

    # A replica that flushed within this many seconds counts as active.
    active_seconds = 30.0

    def __init__(self, url: str, schema: str = "public") -> None:
        self.url = url
        self.schema = schema
        self._pool: asyncpg.Pool | None = None
        self._flushes = 0

    async def start(self) -> None:
        """Connect and migrate; called again after a failure (the pool is kept)."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=2,
                command_timeout=10,
                server_settings={
                    "search_path": self.schema,
                    "application_name": "tollgate-gateway",
                },
            )
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS tollgate_schema (version int PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await conn.fetchval("SELECT coalesce(max(version), 0) FROM tollgate_schema")
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version > done:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO tollgate_schema (version) VALUES ($1)", version)

    async def flush(
        self, batch: Batch, read_days: list[DayWindow], read_minutes: list[MinuteWindow]
    ) -> Totals:
        assert self._pool is not None
        days = sorted(batch.days.items())
        minutes = sorted(batch.minutes.items())
        # The batch's own windows are read too: on a retried batch the upsert is skipped.
        read_days = sorted({*batch.days, *read_days})
        read_minutes = sorted({*batch.minutes, *read_minutes})
        rows = await self._pool.fetch(
            _FLUSH,
            batch.replica_id,
            batch.seq,
            [k for (k, _), _ in days],
            [dt.date.fromisoformat(d) for (_, d), _ in days],
            [c.prompt_tokens for _, c in days],
            [c.completion_tokens for _, c in days],
            [c.requests for _, c in days],
            [k for (k, _), _ in minutes],
            [m for (_, m), _ in minutes],
            [c.tokens for _, c in minutes],
            [c.requests for _, c in minutes],
            [k for k, _ in read_days],
            [dt.date.fromisoformat(d) for _, d in read_days],
            [k for k, _ in read_minutes],
            [m for _, m in read_minutes],
            self.active_seconds,
        )
        totals = Totals()
        for row in rows:
            counts = Usage(row["prompt_tokens"], row["completion_tokens"], row["requests"])
            if row["kind"] == "d":
                totals.days[(row["key_name"], row["day"].isoformat())] = counts
            elif row["kind"] == "r":
                totals.replicas = 1 + row["requests"]
            else:
                totals.minutes[(row["key_name"], row["minute"])] = counts
        for window in read_days:
            totals.days.setdefault(window, Usage())
        for minute_window in read_minutes:
            totals.minutes.setdefault(minute_window, Usage())
        self._flushes += 1
        if self._flushes % 60 == 0:
            await self._cleanup(read_minutes)
        return totals

    async def _cleanup(self, read_minutes: list[MinuteWindow]) -> None:
        assert self._pool is not None
        oldest = min((m for _, m in read_minutes), default=None)
        if oldest is not None:
            await self._pool.execute(_CLEANUP, oldest - 5)
        await self._pool.execute(_CLEANUP_FLUSHES)

    async def day_usage(self, key_name: str, day: str) -> Usage:
        assert self._pool is not None
        row = await self._pool.fetchrow(DAY_USAGE_QUERY, dt.date.fromisoformat(day), [key_name])
        return Usage(row[1], row[2], row[3]) if row else Usage()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
