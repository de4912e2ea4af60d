"""Quota stores: where usage counters live, shared by every replica.

One interface, two implementations: SQLite (the embedded default, one pod's processes)
and Postgres (several replicas). The gateway never waits on a store per request: it keeps
local counters and calls `flush` on a timer with the deltas since the last flush; the
store adds them atomically and answers with the global totals of the windows the replica
tracks, which the next admissions use.

A batch carries `(replica_id, seq)`. A store applies a given batch at most once, so a
flush whose answer was lost (the database went away after committing) can be retried
with the same batch without counting it twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tollgate_contract.usage import Usage

# A day window is (key name, "YYYY-MM-DD" in UTC); a minute window (key name, unix minute).
DayWindow = tuple[str, str]
MinuteWindow = tuple[str, int]


@dataclass(slots=True)
class Batch:
    replica_id: str
    seq: int
    days: dict[DayWindow, Usage] = field(default_factory=dict)
    minutes: dict[MinuteWindow, Usage] = field(default_factory=dict)


@dataclass(slots=True)
class Totals:
    days: dict[DayWindow, Usage] = field(default_factory=dict)
    minutes: dict[MinuteWindow, Usage] = field(default_factory=dict)
    # Replicas that flushed to the store recently, this one included.
    replicas: int = 1


class QuotaStore(Protocol):
    # Whether other replicas write to this store too (then near a limit the ledger
    # confirms admissions against it).
    shared: bool

    async def start(self) -> None:
        """Connect, and create or migrate the schema (safe when replicas start at once)."""

    async def flush(
        self, batch: Batch, read_days: list[DayWindow], read_minutes: list[MinuteWindow]
    ) -> Totals:
        """Add `batch` (at most once) and return the global totals of the batch's windows
        and of the `read_*` windows. Raises on any failure; the caller retries."""

    async def day_usage(self, key_name: str, day: str) -> Usage:
        """One key's global usage for one UTC day."""

    async def close(self) -> None: ...


def open_store(url: str, schema: str = "public", workers: int = 1) -> QuotaStore:
    """The store a `DATABASE_URL` names: `sqlite:///relative.db`, `sqlite:////abs.db`
    (SQLAlchemy's convention), or `postgresql://…`. A SQLite file is shared when the
    pod's `workers` all write to it."""
    if url.startswith("sqlite:///"):
        from tollgate_gateway.stores.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"), shared=workers > 1)
    if url.startswith(("postgres://", "postgresql://")):
        from tollgate_gateway.stores.postgres import PostgresStore

        return PostgresStore(url, schema)
    raise ValueError("DATABASE_URL must start with sqlite:/// or postgresql://")
