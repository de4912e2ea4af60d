"""What the gateway learned about one request: filled along the request path, read once
at its end for accounting and the request's log line."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

from tollgate_gateway.quota import Admission
from tollgate_gateway.usage import Usage

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is on
    from tollgate_gateway.tracing import RequestTrace
    from tollgate_gateway.upstream import Upstream


@dataclass(slots=True)
class Exchange:
    route: str
    started: float
    request_id: str = ""
    key_name: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0
    error: str | None = None
    # Why the gateway refused the request itself (metrics' rejection reason), if it did.
    rejection: str | None = None
    # What went wrong with the upstream (unreachable, timeout, error, ...), if anything.
    upstream_error: str | None = None
    upstream_status: int | None = None
    # The replica the request went to (the last one, if it was retried).
    upstream: Upstream | None = None
    retried: bool = False
    # Time spent waiting on the upstream (headers, and the body of a non-stream answer):
    # the gateway's own overhead is the rest.
    upstream_seconds: float = 0.0
    ttft_seconds: float | None = None
    usage: Usage | None = None
    # The quota reservation, settled when the request ends.
    admission: Admission | None = None
    trace: RequestTrace | None = None
    streamed_chunks: int = 0
    response_started: bool = False
    # The last response byte is on its way: a disconnect now is no longer an abandonment.
    responded: bool = False
    completed: bool = False
    client_gone: bool = False

    def overhead_seconds(self) -> float:
        return perf_counter() - self.started - self.upstream_seconds

    def overhead_header(self) -> bytes:
        return b"%.3f" % (self.overhead_seconds() * 1000)
