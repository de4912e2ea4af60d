"""Today's token usage per key, read from the gateway's quota store (Postgres).

The table and the one query the operator may make of it belong to the contract
(`tollgate_contract.usage`): the gateway writes `USAGE_TABLE`, the operator reads it only
through `DAY_USAGE_QUERY`, for ApiKey status, with one query per gateway per refresh and a
tiny pool per database. No database configured: no usage (not an error). A database that
cannot be reached: usage stays as last read and the error is logged; status never blocks
on it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from tollgate_contract.usage import DAY_USAGE_QUERY, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DayUsage:
    """One gateway's keys on one UTC day (keys with no row read as zeros)."""

    day: datetime.date
    keys: dict[str, Usage] = field(default_factory=dict)


def usage_status(day: datetime.date, usage: Usage) -> dict[str, object]:
    """The `status.usage` of an ApiKey."""
    return {
        "day": day.isoformat(),
        "tokensToday": usage.tokens,
        "promptTokens": usage.prompt_tokens,
        "completionTokens": usage.completion_tokens,
        "requests": usage.requests,
    }


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


class UsageReader:
    """One small asyncpg pool per database URL, created on first use."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._pools: dict[str, Any] = {}  # asyncpg.Pool (untyped)
        self._lock = asyncio.Lock()
        self._timeout = timeout

    async def today(
        self, database_url: str, key_names: Sequence[str], day: datetime.date | None = None
    ) -> DayUsage:
        """Usage for each named key on `day` (UTC today); keys with no row get zeros.
        A store that has never been written (no table yet) reads as zeros too."""
        result = DayUsage(day or utc_today(), {name: Usage() for name in key_names})
        if not key_names:
            return result
        pool = await self._pool(database_url)
        try:
            rows = await pool.fetch(
                DAY_USAGE_QUERY, result.day, list(key_names), timeout=self._timeout
            )
        except asyncpg.UndefinedTableError:
            return result
        for name, prompt, completion, requests in rows:
            result.keys[name] = Usage(int(prompt), int(completion), int(requests))
        return result

    async def _pool(self, database_url: str) -> Any:
        async with self._lock:
            pool = self._pools.get(database_url)
            if pool is None:
                pool = await asyncpg.create_pool(
                    database_url, min_size=0, max_size=2, timeout=self._timeout
                )
                self._pools[database_url] = pool
            return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
