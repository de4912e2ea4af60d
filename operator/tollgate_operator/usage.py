"""Today's token usage per key, read from the gateway's quota store (Postgres).

The gateway writes table `tollgate_usage(key_name, day, prompt_tokens, completion_tokens,
requests)`, day being the UTC date. The operator only reads it, for ApiKey status, with one
query per gateway per refresh and a tiny pool per database. No database configured: no
usage (not an error). A database that cannot be reached: usage stays as last read and the
error is logged; status never blocks on it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

log = logging.getLogger(__name__)

QUERY = """
SELECT key_name,
       COALESCE(SUM(prompt_tokens), 0)::bigint,
       COALESCE(SUM(completion_tokens), 0)::bigint,
       COALESCE(SUM(requests), 0)::bigint
  FROM tollgate_usage
 WHERE day = $1 AND key_name = ANY($2::text[])
 GROUP BY key_name
"""


@dataclass(frozen=True)
class Usage:
    day: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_status(self) -> dict[str, object]:
        return {
            "day": self.day,
            "tokensToday": self.tokens,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "requests": self.requests,
        }


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


class UsageReader:
    """One small asyncpg pool per database URL, created on first use."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._pools: dict[str, asyncpg.Pool] = {}
        self._lock = asyncio.Lock()
        self._timeout = timeout

    async def today(
        self, database_url: str, key_names: Sequence[str], day: datetime.date | None = None
    ) -> dict[str, Usage]:
        """Usage for each named key on `day` (UTC today); keys with no row get zeros.
        A store that has never been written (no table yet) reads as zeros too."""
        day = day or utc_today()
        stamp = day.isoformat()
        result = {name: Usage(stamp) for name in key_names}
        if not key_names:
            return result
        pool = await self._pool(database_url)
        try:
            rows = await pool.fetch(QUERY, day, list(key_names), timeout=self._timeout)
        except asyncpg.UndefinedTableError:
            return result
        for name, prompt, completion, requests in rows:
            result[name] = Usage(stamp, int(prompt), int(completion), int(requests))
        return result

    async def _pool(self, database_url: str) -> asyncpg.Pool:
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
