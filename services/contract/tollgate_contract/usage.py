"""The usage table: written by the gateway's Postgres store, read by the operator.

`tollgate_usage` holds one row per key name and UTC day. Its schema is the migration list
below (applied in order, each once, recorded in `tollgate_schema`); `SCHEMA_VERSION` is the
version this code writes. The operator reads it only through `DAY_USAGE_QUERY`, so the
table can change only here, with both sides' tests watching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

USAGE_TABLE: Final = "tollgate_usage"

# Applied in order, each once; never edit a released entry, append a new one.
MIGRATIONS: Final = (
    """
    CREATE TABLE tollgate_usage (
        key_name text NOT NULL,
        day date NOT NULL,
        prompt_tokens bigint NOT NULL DEFAULT 0,
        completion_tokens bigint NOT NULL DEFAULT 0,
        requests bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (key_name, day)
    );
    CREATE TABLE tollgate_usage_minute (
        key_name text NOT NULL,
        minute bigint NOT NULL,
        tokens bigint NOT NULL DEFAULT 0,
        requests bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (key_name, minute)
    );
    CREATE TABLE tollgate_flushes (
        replica_id text PRIMARY KEY,
        seq bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# Usage of the named keys ($2, text[]) on one UTC day ($1, date): rows
# (key_name, prompt_tokens, completion_tokens, requests); keys without a row are absent.
DAY_USAGE_QUERY: Final = """
SELECT key_name, prompt_tokens, completion_tokens, requests
  FROM tollgate_usage
 WHERE day = $1 AND key_name = ANY($2::text[])
"""


@dataclass(slots=True)
class Usage:
    """Tokens and requests: of one request, one window, or one key's day."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests
