"""Watching an SSE stream as it passes through, without re-encoding it.

The bytes go to the client as they came; the watcher only needs event boundaries
(`\n\n`, as vLLM writes them) to do three things: count the chunks (the estimate for a
stream that breaks), read the usage chunk, and remove that chunk when the gateway asked
for it and the client did not. A partial event is held back until its end arrives, so a
usage chunk split across reads can still be removed; whole events pass at once.
"""

from __future__ import annotations

import json

from tollgate_gateway.usage import Usage, parse_usage

_USAGE_MARK = b'"usage":{'
_DONE = b"data: [DONE]\n\n"


class StreamTap:
    __slots__ = ("_held", "chunks", "done", "strip_usage", "usage")

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self.chunks = 0  # data events other than the usage chunk and [DONE]
        self.done = False
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward now: every complete event received so far."""
        if self._held:
            data = self._held + data
            self._held = b""
        end = data.rfind(b"\n\n")
        if end < 0:
            self._held = data
            return b""
        end += 2
        if end != len(data):
            self._held = data[end:]
            data = data[:end]
        events = data.count(b"\n\n")
        if _USAGE_MARK in data:
            data, events = self._take_usage(data, events)
        if data.endswith(_DONE):
            self.done = True
            events -= 1
        self.chunks += events
        return data

    def flush(self) -> bytes:
        """Whatever is held back when the stream ends (an unterminated last event)."""
        held, self._held = self._held, b""
        return held

    def _take_usage(self, data: bytes, events: int) -> tuple[bytes, int]:
        kept = []
        for event in data.split(b"\n\n")[:-1]:
            if _USAGE_MARK in event and event.startswith(b"data: "):
                try:
                    chunk = json.loads(event[6:])
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict):
                    usage = parse_usage(chunk.get("usage"))
                    if usage is not None:
                        self.usage = usage
                    if chunk.get("choices") == []:
                        # The usage chunk proper: never counted as content.
                        events -= 1
                        if self.strip_usage:
                            continue
            kept.append(event + b"\n\n")
        return b"".join(kept), events
