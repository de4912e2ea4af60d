"""Watching a stream of named events (Responses, Anthropic Messages) as it passes through.

These protocols always carry their usage — Responses in `response.completed`, Anthropic
in `message_start` (input) and `message_delta` (output, cumulative) — so, unlike OpenAI
chunk streams (`sse.StreamTap`), nothing is injected or removed: the bytes go to the
client as they came, at once. The tap only reads: the usage objects, merged by taking
the larger count of each kind (so either placement of Anthropic's input tokens works),
and the number of text deltas, the estimate for a stream that breaks before its usage.
"""

from __future__ import annotations

import json

from tollgate_contract.usage import Usage
from tollgate_gateway.sse import MAX_HELD, separator
from tollgate_gateway.usage import USAGE_KEY, parse_usage

_decoder = json.JSONDecoder()


class EventTap:
    __slots__ = ("_delta_marker", "_sep", "_tail", "chunks", "usage")

    def __init__(self, delta_marker: bytes) -> None:
        """`delta_marker`: the bytes that start each text delta event's name line."""
        self._delta_marker = delta_marker
        self._tail = b""
        self._sep = b""  # the stream's event separator, once known (sse.separator)
        self.chunks = 0
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward now: all of them. Complete events are scanned once."""
        buffered = self._tail + data if self._tail else data
        sep = self._sep or separator(buffered) or b""
        end = buffered.rfind(sep) if sep else -1
        if end < 0:
            # A partial event: scanned when it ends, unless it outgrows MAX_HELD.
            self._tail = buffered if len(buffered) <= MAX_HELD else b""
            return data
        self._sep = sep
        end += len(sep)
        complete, self._tail = buffered[:end], buffered[end:]
        self.chunks += complete.count(self._delta_marker)
        if b'"usage"' in complete:
            for found in USAGE_KEY.finditer(complete):
                self._read_usage(complete, found.end() - 1)
        return data

    def flush(self) -> bytes:
        """Nothing is held back from the client; the unscanned tail is dropped."""
        self._tail = b""
        return b""

    def _read_usage(self, data: bytes, start: int) -> None:
        try:
            obj, _ = _decoder.raw_decode(data[start:].decode(errors="replace"))
        except ValueError:
            return
        usage = parse_usage(obj)
        if usage is None:
            return
        if self.usage is None:
            self.usage = usage
        else:
            self.usage.prompt_tokens = max(self.usage.prompt_tokens, usage.prompt_tokens)
            self.usage.completion_tokens = max(
                self.usage.completion_tokens, usage.completion_tokens
            )
