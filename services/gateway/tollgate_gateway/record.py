"""What the gateway learned about one request: filled along the request path, read once
at its end, where it is settled (quota, metrics, trace, the log line)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol

from tollgate_contract.usage import Usage
from tollgate_gateway.quota import Admission

CLIENT_CLOSED_REQUEST = 499


class RequestTrace(Protocol):
    """What the request path does with a request's trace (`tracing.RequestTrace`, only
    when tracing is on): named here so this module needs no OpenTelemetry."""

    def mark(self, name: str) -> None: ...

    def describe_request(self, fields: Mapping[str, Any]) -> None: ...

    def start_upstream(self, url: str, headers: dict[str, str]) -> None: ...

    def end_upstream(self, status: int | None) -> None: ...

    def end(self, record: RequestRecord) -> None: ...


class Phase(enum.Enum):
    """Where the client's side of a request is; it only moves forward."""

    # Nothing sent to the client yet: a failure can still be answered with an error.
    RECEIVING = "receiving"
    # Response headers sent; the body (or a stream) is under way.
    RESPONDING = "responding"
    # The last byte is on its way: a disconnect now is no longer an abandonment.
    RESPONDED = "responded"
    # The client left before the answer ended.
    ABANDONED = "abandoned"
    # The gateway cut it short (the drain deadline passed).
    CUT = "cut"


@dataclass(slots=True)
class RequestRecord:
    # The endpoint's route (parameters as `{id}`) and GenAI operation name.
    route: str
    operation: str
    started: float
    request_id: str = ""
    key_name: str | None = None
    model: str | None = None
    stream: bool = False
    phase: Phase = Phase.RECEIVING
    status: int = 0
    error: str | None = None
    # Why the gateway refused the request itself (metrics' rejection reason), if it did.
    rejection: str | None = None
    # What went wrong with the upstream (unreachable, timeout, ...), if anything.
    upstream_error: str | None = None
    upstream_status: int | None = None
    # The model answered instead, when the one asked for had no replica available.
    fallback: str | None = None
    # Time spent waiting on the upstream (headers, and the body of a non-stream answer):
    # the gateway's own overhead is the rest.
    upstream_seconds: float = 0.0
    ttft_seconds: float | None = None
    # The upstream's own usage, or (`usage_exact` False) the estimate for a request that
    # ended before the upstream reported it: prompt tokens the upstream processed are
    # charged even when the client left early.
    usage: Usage | None = None
    usage_exact: bool = True
    prompt_estimate: int = 0
    # True while a replica may be spending tokens on the request that it has not reported
    # (from sending it until its answer, or its stream's usage, has been read).
    awaiting_usage: bool = False
    streamed_chunks: int = 0
    # The quota reservation, settled when the request ends.
    admission: Admission | None = None
    trace: RequestTrace | None = None

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """The gateway's own headers on a proxied answer."""
        headers = [
            (b"x-request-id", self.request_id.encode()),
            (b"x-tollgate-overhead-ms", self.overhead_header()),
        ]
        if self.fallback is not None:
            headers.append((b"x-tollgate-fallback", self.fallback.encode()))
        return headers

    def overhead_seconds(self) -> float:
        return perf_counter() - self.started - self.upstream_seconds

    def overhead_header(self) -> bytes:
        return b"%.3f" % (self.overhead_seconds() * 1000)

    def finish(self) -> None:
        """At the end: the status a client that left gets in logs and metrics (nginx's
        499, "client closed request"), and the usage of a request that reached the
        upstream but ended without its report (a broken, abandoned or cut stream; a
        client that left a non-stream request): the prompt estimate plus one completion
        token per content chunk streamed."""
        if self.phase is Phase.ABANDONED and self.status == 0:
            self.status = CLIENT_CLOSED_REQUEST
        if self.usage is None and self.awaiting_usage:
            self.usage = Usage(self.prompt_estimate, self.streamed_chunks, 1)
            self.usage_exact = False
