"""The ledger on the shared store (PostgreSQL): a view of the other replicas too old to
judge by sends every admission to the store, however far the key is from its limits."""

from __future__ import annotations

import asyncio
import time

from pg import PgSchema

from tollgate_contract.config import Policy
from tollgate_gateway.keys import ApiKey, key_hash
from tollgate_gateway.quota import QuotaLedger
from tollgate_gateway.stores.postgres import PostgresStore

FLUSH_SECONDS = 1.0


def test_a_view_older_than_two_flush_intervals_is_confirmed_with_the_store(pg: PgSchema) -> None:
    async def scenario() -> None:
        now = [time.time()]
        ledger = QuotaLedger(PostgresStore(pg.url, pg.name), FLUSH_SECONDS, clock=lambda: now[0])
        await ledger.start(["team-a"])
        try:
            limited = ApiKey("team-a", key_hash("sk-a"), Policy(tokens_per_day=10**9))
            for _ in range(3):
                assert not ledger.admit(limited, 10, 10).confirm  # far from the limit
            # No flush for 2.5 intervals (one queued at the store, say): nothing awaits
            # here, so the ledger's own flush timer cannot run in between either.
            now[0] += 2.5 * FLUSH_SECONDS
            assert ledger.admit(limited, 10, 10).confirm
        finally:
            await ledger.close()

    asyncio.run(scenario())
