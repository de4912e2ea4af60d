"""The embedded quota store: one SQLite file, for the worker processes of one gateway pod.

sqlite3 is blocking, so every call runs in one worker thread (`asyncio.to_thread` behind a
lock); that is fine because the store is only touched by the flush timer and `/v1/usage`,
never per request. WAL mode keeps a reader (the operator, `sqlite3` on the command line)
from blocking a flush.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from tollgate_contract.usage import Usage
from tollgate_gateway.stores import Batch, DayWindow, MinuteWindow, Totals

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tollgate_usage (
    key_name TEXT NOT NULL,
    day TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_name, day)
);
CREATE TABLE IF NOT EXISTS tollgate_usage_minute (
    key_name TEXT NOT NULL,
    minute INTEGER NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_name, minute)
);
CREATE TABLE IF NOT EXISTS tollgate_flushes (
    replica_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
"""
# Files made before the workers shared them have no flush times.
_FLUSH_TIMES = "ALTER TABLE tollgate_flushes ADD COLUMN updated_at REAL NOT NULL DEFAULT 0"

_DAY_UPSERT = """
INSERT INTO tollgate_usage (key_name, day, prompt_tokens, completion_tokens, requests)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (key_name, day) DO UPDATE SET
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    requests = requests + excluded.requests
"""
_MINUTE_UPSERT = """
INSERT INTO tollgate_usage_minute (key_name, minute, tokens, requests) VALUES (?, ?, ?, ?)
ON CONFLICT (key_name, minute) DO UPDATE SET
    tokens = tokens + excluded.tokens, requests = requests + excluded.requests
"""


class SqliteStore:
    # A worker that flushed within this long counts as another replica (postgres.py's).
    active_seconds = 30.0

    def __init__(self, path: str, shared: bool = False) -> None:
        """`shared`: the workers of one pod flush to this file too (each flush is one
        `BEGIN IMMEDIATE` transaction, so they take turns)."""
        self.path = path
        self.shared = shared
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            assert self._db is not None
            return await asyncio.to_thread(fn, self._db)

    async def start(self) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(tollgate_flushes)")}
            if "updated_at" not in columns:
                try:
                    db.execute(_FLUSH_TIMES)
                except sqlite3.OperationalError as exc:
                    # The pod's other worker, starting at the same moment, added it first:
                    # failing here would leave this worker on its own counts (fail-open).
                    if "duplicate column" not in str(exc):
                        raise
            return db

        self._db = await asyncio.to_thread(connect)

    async def flush(
        self, batch: Batch, read_days: list[DayWindow], read_minutes: list[MinuteWindow]
    ) -> Totals:
        def apply(db: sqlite3.Connection) -> Totals:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT seq FROM tollgate_flushes WHERE replica_id = ?", (batch.replica_id,)
                ).fetchone()
                now = time.time()
                if row is None or row[0] < batch.seq:
                    db.execute(
                        "INSERT OR REPLACE INTO tollgate_flushes (replica_id, seq, updated_at)"
                        " VALUES (?, ?, ?)",
                        (batch.replica_id, batch.seq, now),
                    )
                    db.executemany(
                        _DAY_UPSERT,
                        [
                            (k, d, c.prompt_tokens, c.completion_tokens, c.requests)
                            for (k, d), c in batch.days.items()
                        ],
                    )
                    db.executemany(
                        _MINUTE_UPSERT,
                        [(k, m, c.tokens, c.requests) for (k, m), c in batch.minutes.items()],
                    )
                (others,) = db.execute(
                    "SELECT count(*) FROM tollgate_flushes WHERE replica_id <> ?"
                    " AND updated_at > ?",
                    (batch.replica_id, now - self.active_seconds),
                ).fetchone()
                totals = Totals(replicas=1 + others)
                for day_window in {*batch.days, *read_days}:
                    totals.days[day_window] = _read_day(db, *day_window)
                for minute_window in {*batch.minutes, *read_minutes}:
                    got = db.execute(
                        "SELECT tokens, requests FROM tollgate_usage_minute"
                        " WHERE key_name = ? AND minute = ?",
                        minute_window,
                    ).fetchone()
                    totals.minutes[minute_window] = Usage(got[0], 0, got[1]) if got else Usage()
                oldest = min((m for _, m in read_minutes), default=None)
                if oldest is not None:
                    db.execute("DELETE FROM tollgate_usage_minute WHERE minute < ?", (oldest - 5,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return totals

        return await self._run(apply)

    async def day_usage(self, key_name: str, day: str) -> Usage:
        return await self._run(lambda db: _read_day(db, key_name, day))

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)


def _read_day(db: sqlite3.Connection, key_name: str, day: str) -> Usage:
    got = db.execute(
        "SELECT prompt_tokens, completion_tokens, requests FROM tollgate_usage"
        " WHERE key_name = ? AND day = ?",
        (key_name, day),
    ).fetchone()
    return Usage(*got) if got else Usage()
