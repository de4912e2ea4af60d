"""Watching an SSE stream as it passes through, without re-encoding it.

The bytes go to the client as they came; the watcher only needs event boundaries
(`\n\n` as vLLM writes them, or `\r\n\r\n`, which the SSE spec allows and other servers
write: the stream's first line end decides) to do three things: count the chunks (the
estimate for a stream that breaks), read the usage chunk, and remove that chunk when the
gateway asked for it and the client did not. A partial event is held back until its end
arrives, so a usage chunk split across reads can still be removed; whole events pass at
once. An event longer than MAX_HELD is passed on unread rather than held without bound.

Per read the cost is three scans in C (the last boundary, the event count, the last
`"usage"`) and, only in the read that holds the usage key, one event parsed (and cut out,
one copy). Other events are never split, parsed or copied.
"""

from __future__ import annotations

import json

from tollgate_gateway.usage import USAGE_KEY, Usage, parse_usage

# The most of a partial event held back (vLLM's events are a few hundred bytes).
MAX_HELD = 1 << 20


def separator(data: bytes) -> bytes | None:
    """A stream's event separator, from its first line end (None: none seen yet)."""
    end = data.find(b"\n")
    if end < 0:
        return None
    return b"\r\n\r\n" if end > 0 and data[end - 1] == 0x0D else b"\n\n"


class StreamTap:
    __slots__ = ("_done", "_held", "_sep", "chunks", "done", "strip_usage", "usage")

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self.chunks = 0  # events other than the usage chunk and [DONE]
        self.done = False
        self._held = b""
        self._sep = b""  # the stream's event separator, once known
        self._done = b""

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward now: every complete event received so far."""
        if self._held:
            data = self._held + data
            self._held = b""
        sep = self._sep
        if not sep:
            found = separator(data)
            if found is None:
                return self._hold(data)
            sep = self._sep = found
            self._done = b"data: [DONE]" + sep
        end = data.rfind(sep)
        if end < 0:
            return self._hold(data)
        end += len(sep)
        if end != len(data):
            self._held = data[end:]
            data = data[:end]
        events = data.count(sep)
        at = data.rfind(b'"usage"')
        if at >= 0:
            data, events = self._take_usage(data, at, events, sep)
        if data.endswith(self._done):
            self.done = True
            events -= 1
        self.chunks += events
        return data

    def _hold(self, data: bytes) -> bytes:
        """A partial event waits for its end, up to MAX_HELD (then it goes on as is)."""
        if len(data) > MAX_HELD:
            return data
        self._held = data
        return b""

    def flush(self) -> bytes:
        """Whatever is held back when the stream ends (an unterminated last event)."""
        held, self._held = self._held, b""
        return held

    def _take_usage(self, data: bytes, at: int, events: int, sep: bytes) -> tuple[bytes, int]:
        """Read the usage of the event holding the last usage key (at or before `at`, the
        last `"usage"`); drop that event from the count if it is the usage chunk proper
        (`choices: []`), and from `data` too if the client did not ask for it.

        The usage chunk is the last event before [DONE], and the newest of vLLM's
        continuous usage stats is in the last event, so the last `"usage"` is nearly always
        the one; only when it is not a usage object (OpenAI's `"usage": null` in content
        chunks) are the bytes before it searched, once, in C.
        """
        if USAGE_KEY.match(data, at) is None:
            found = None
            for found in USAGE_KEY.finditer(data, 0, at):  # noqa: B007 (the last one)
                pass
            if found is None:
                return data, events
            at = found.start()
        boundary = data.rfind(sep, 0, at)
        start = boundary + len(sep) if boundary >= 0 else 0  # the event's
        line = max(start, data.rfind(b"\n", start, at) + 1)  # its `data:` line
        if not data.startswith(b"data:", line):
            return data, events
        try:
            chunk = json.loads(data[line + 5 : data.index(b"\n", at)])
        except ValueError:
            return data, events
        if not isinstance(chunk, dict):
            return data, events
        usage = parse_usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        if chunk.get("choices") != []:
            return data, events  # content (vLLM's continuous usage stats): never removed
        if self.strip_usage:
            data = data[:start] + data[data.index(sep, at) + len(sep) :]
        return data, events - 1
