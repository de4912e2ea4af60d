"""PostgreSQL for the tests: find one, or run a throwaway cluster.

`find_database()` follows the order the README promises: `DATABASE_URL` when set, else
the server on 127.0.0.1:5432 when it answers, else a throwaway cluster made with the
installed PostgreSQL binaries (initdb/pg_ctl in a temporary directory), else None.
`TempPostgres` is also what the outage tests stop and start; `PgSchema` reads the
gateway's usage table in one schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg


def _answers(url: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return Path(versions[0]).parent if versions else None


class TempPostgres:
    """A cluster in a temporary directory, on its own port, trust auth, user `postgres`.
    As root the server runs as the `postgres` system user (initdb refuses root)."""

    def __init__(self, port: int) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) found")
        self.bindir = bindir
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))
        self.data = self.dir / "data"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bindir / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_database(port_for_temp: int) -> tuple[str, TempPostgres | None] | None:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url, None
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    if _answers(local):
        return local, None
    if pg_bin() is None:
        return None
    temp = TempPostgres(port_for_temp)
    temp.start()
    return temp.url, temp


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
