"""One request and its answer: what handlers read (method, path, headers, body, knobs) and
the only ways they write (a whole response, or a stream of events), so the JSON style,
the body mode and keep-alive apply to every route alike."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from tollgate_sim import http
from tollgate_sim.errors import ApiError, not_found_model
from tollgate_sim.knobs import Knobs
from tollgate_sim.state import State, resolve_model


class Wire(Protocol):
    """The connection, as a handler sees it."""

    closed: bool

    def write(self, data: bytes) -> None: ...

    def finish(self, keep_alive: bool) -> None:
        """The response is complete: close, or wait for the next request."""

    def abort(self) -> None:
        """Drop the connection with a TCP reset."""


@dataclass
class Exchange:
    state: State
    wire: Wire
    method: bytes
    path: str
    query: str
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool
    knobs: Knobs
    # The error shape of this route: "openai" or "anthropic".
    flavor: str = "openai"
    params: dict[str, str] = field(default_factory=dict)

    # Reading
    def json(self) -> dict[str, Any]:
        """The JSON object body, validated as vLLM's validate_json_request and FastAPI do."""
        media = self.headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if media != b"application/json":
            raise ApiError("Unsupported Media Type: Only 'application/json' is allowed")
        try:
            data = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(f"Invalid JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError("The request body must be a JSON object.")
        return data

    def model(self, data: dict[str, Any]) -> tuple[str, str | None]:
        resolved = resolve_model(self.knobs, data.get("model"))
        if resolved is None:
            raise not_found_model(str(data.get("model")))
        return resolved

    def request_id(self) -> str | None:
        rid = self.headers.get(b"x-request-id")
        return rid.decode() if rid else None

    # Writing
    def _spaced(self) -> bool:
        return self.knobs.json_style == "spaced"

    def send(self, status: int, body: bytes, content_type: bytes | None = http.JSON) -> None:
        if self.wire.closed:
            return
        if content_type == http.JSON and body and self._spaced():
            body = http.respace(body)
        chunked = self.knobs.body_mode == "chunked"
        self.wire.write(http.response(status, body, self.keep_alive, content_type, chunked))
        self.wire.finish(self.keep_alive)

    def send_error(self, exc: ApiError) -> None:
        self.send(exc.status, exc.body(self.flavor))

    def start_stream(self, content_type: bytes = http.SSE) -> None:
        self.wire.write(http.stream_head(self.keep_alive, content_type))

    def emit(self, events: list[bytes]) -> None:
        """Events as one chunk each, in one write (one syscall for a whole fast stream)."""
        if self._spaced():
            events = [http.respace(e) for e in events]
        if self.knobs.sse_newline == "crlf":  # JSON has no raw newline: only line ends
            events = [e.replace(b"\n", b"\r\n") for e in events]
        self.wire.write(b"".join(http.chunk(e) for e in events))

    def end_stream(self) -> None:
        self.wire.write(http.LAST_CHUNK)
        self.wire.finish(self.keep_alive)
