"""The request path of every route in the endpoint table (`endpoints.py`), in order.

This is raw ASGI on purpose: it runs for every request and every streamed chunk, so it
avoids the framework's routing, request objects and middleware (FastAPI serves the
gateway's own endpoints). `Proxy.handle` reads top to bottom as the gateway's whole job:

1. ingress: request id, body size (413), client IP and its rate limit (429), which
   headers may go upstream (an allow-list)
2. authenticate: the key (401), from the one credential the request carries
3. parse (`outgoing.py`): the body (400), the key's model list (403), what goes upstream
4. admit: the key's quota and limits (429), reserving every token the request may use
   (its output cap for each of its `n` / `best_of` sequences)
5. route: a replica serving the model (or its fallback), healthy, its breaker not open
   (else 404 for a model nobody serves, 503 without touching any upstream)
6. forward: the body as bytes, the client's key replaced by `VLLM_API_KEY`; retried once
   on another replica if it failed before any response byte
7. respond: whole, or SSE piece by piece as it arrives (each handed from the upstream
   connection's callback straight to the client's: `_Relay`), its usage read on the way
8. settle: usage, quota, metrics, trace and one log line, always, also when the client
   leaves, the stream breaks or the drain deadline cuts it
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

from tollgate_gateway import endpoints, errors
from tollgate_gateway.asgi import (
    ON_DISCONNECT,
    WRITE,
    Receive,
    Scope,
    Send,
    Write,
    request_id_for,
    send_refusal,
)
from tollgate_gateway.config_watch import CurrentConfig
from tollgate_gateway.endpoints import Body, Endpoint, Stream
from tollgate_gateway.errors import ErrorKind, Refusal
from tollgate_gateway.events import EventTap
from tollgate_gateway.fairqueue import FairQueue
from tollgate_gateway.keys import CREDENTIAL_HEADERS, ApiKey
from tollgate_gateway.lifecycle import Lifecycle
from tollgate_gateway.outgoing import Outgoing, prepare, send_as
from tollgate_gateway.quota import QuotaLedger
from tollgate_gateway.ratelimit import ClientAddress, Gcra
from tollgate_gateway.record import Phase, RequestRecord
from tollgate_gateway.sse import StreamTap
from tollgate_gateway.upstream import (
    Attempt,
    Limits,
    Outcome,
    Upstream,
    UpstreamFailure,
    UpstreamPool,
)
from tollgate_gateway.usage import estimate_prompt_tokens, usage_from_body

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is on
    from tollgate_gateway.tracing import Tracing

log = logging.getLogger("tollgate.proxy")

# Stored responses remembered by the replica that holds them.
RESPONSE_HOMES = 100_000
RESPONSES_PREFIX = "/v1/responses/"
_RESPONSE_ID = re.compile(rb'"id"[ \t\r\n]*:[ \t\r\n]*"(resp_[A-Za-z0-9_-]{1,128})"')

# Sent upstream whatever the configuration: what vLLM uses (the request id becomes its
# completion id; trace context joins its spans). Everything else needs the allow-list.
_ALWAYS_FORWARDED = frozenset({b"x-request-id", b"traceparent", b"tracestate"})
# Never sent upstream, whatever the allow-list says: the client's credentials and cookies,
# hop-by-hop headers, and those the gateway sets itself.
NEVER_FORWARDED = CREDENTIAL_HEADERS | {
    b"cookie", b"host", b"content-length", b"content-type", b"transfer-encoding",
    b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-authorization",
    b"proxy-connection", b"expect", b"accept-encoding", b"forwarded", b"x-forwarded-for",
    b"x-real-ip",
}  # fmt: skip


@dataclass(slots=True)
class ProxySettings:
    """What the request path needs of the settings, resolved once at start."""

    max_body: int
    max_in_flight: int
    default_reserve: int
    affinity_mode: str
    affinity_header: bytes
    forward_exact: frozenset[bytes]
    forward_prefixes: tuple[bytes, ...]
    upstream_authorization: str | None
    timeout_whole: Limits
    timeout_stream: Limits


@dataclass(slots=True)
class Ingress:
    """What one pass over the request headers found."""

    forward: dict[str, str]
    session: str | None
    content_type: bytes | None


class Proxy:
    def __init__(
        self,
        settings: ProxySettings,
        current: CurrentConfig,
        ip_limit: Gcra | None,
        client_address: ClientAddress,
        quota: QuotaLedger,
        pool: UpstreamPool,
        queue: FairQueue | None,
        lifecycle: Lifecycle,
        tracer: Tracing | None,
        settle: Callable[[RequestRecord], None],
    ) -> None:
        self.settings = settings
        self.current = current
        self.ip_limit = ip_limit
        self.client_address = client_address
        self.quota = quota
        self.pool = pool
        self.queue = queue
        self.lifecycle = lifecycle
        self.tracer = tracer
        self._settle = settle
        self._response_homes: OrderedDict[str, Upstream] = OrderedDict()

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
        record = RequestRecord(
            route=endpoint.route, operation=endpoint.operation, started=perf_counter()
        )
        if self.tracer is not None:
            record.trace = self.tracer.begin(endpoint, scope["headers"])
        self.lifecycle.inflight += 1
        try:
            if self.lifecycle.inflight > self.settings.max_in_flight:
                raise Refusal(
                    errors.OVERLOADED,
                    "The gateway is at its limit of requests in flight; retry shortly.",
                    1,
                    reason="overload",
                )
            ingress = self.ingress(record, scope)
            key = self.current.ring.authenticate(scope["headers"])
            record.key_name = key.name
            if record.trace is not None:
                record.trace.mark("auth")
            body = await self._read_body(receive)
            if body is None:
                record.phase = Phase.ABANDONED
                return
            outgoing = prepare(
                record, endpoint, key, scope, ingress.content_type, body, self.current.models
            )
            self.admit(record, endpoint, key, outgoing)
            if record.admission is not None and record.admission.confirm:
                await self.quota.confirm(key, record.admission)
            place: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
            if self.queue is not None:
                priority = (key.policy.priority or 0) if key.policy is not None else 0
                place = self.queue.turn(key.name, priority, outgoing.model)
            async with place:
                affinity = self._affinity(ingress.session, key.name)
                upstream = self.route(record, outgoing, affinity, scope["path"])
                extensions = scope["extensions"]
                await self.forward(
                    record,
                    extensions[ON_DISCONNECT],
                    send,
                    extensions[WRITE],
                    upstream,
                    outgoing,
                    ingress,
                    affinity,
                )
        except Refusal as refusal:
            record.status, record.error = refusal.kind.status, refusal.kind.code
            record.rejection = refusal.reason
            record.upstream_error = refusal.upstream_error or record.upstream_error
            await send_refusal(send, refusal, record.request_id)
        except asyncio.CancelledError:
            if record.phase is Phase.ABANDONED:
                return  # the client left; its request is settled below
            # The drain deadline: tell the client, settle what it used, end the task.
            if record.phase is Phase.RECEIVING:
                record.status = errors.SHUTTING_DOWN.status
                message = "The gateway is shutting down; the request was not completed."
                await send_refusal(send, Refusal(errors.SHUTTING_DOWN, message), record.request_id)
            record.phase, record.error = Phase.CUT, errors.SHUTTING_DOWN.code
            raise
        except Exception:
            log.exception("unexpected error", extra={"request_id": record.request_id})
            record.status, record.error = 500, errors.INTERNAL.code
            if record.phase is Phase.RECEIVING:
                internal = Refusal(errors.INTERNAL, "Internal gateway error.")
                await send_refusal(send, internal, record.request_id)
        finally:
            self.lifecycle.inflight -= 1
            record.finish()
            self._settle(record)

    # 1. Ingress

    def ingress(self, record: RequestRecord, scope: Scope) -> Ingress:
        """One pass over the headers: request id, size, IP limit, what may go upstream."""
        settings = self.settings
        request_id = length = forwarded_for = session = content_type = None
        forward: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
                continue
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"x-forwarded-for":
                forwarded_for = value
            elif name == settings.affinity_header:
                session = value.decode("latin-1")
            if (
                name in _ALWAYS_FORWARDED
                or name in settings.forward_exact
                or (
                    settings.forward_prefixes
                    and name.startswith(settings.forward_prefixes)
                    and name not in NEVER_FORWARDED
                )
            ):
                forward[name.decode("latin-1")] = value.decode("latin-1")
        record.request_id = request_id_for(request_id)
        forward["x-request-id"] = record.request_id
        if length is not None and (not length.isdigit() or int(length) > settings.max_body):
            raise Refusal(errors.BODY_TOO_LARGE, self._too_large(), reason="size")
        if self.ip_limit is not None:
            peer = scope["client"][0] if scope.get("client") else ""
            wait = self.ip_limit.check(self.client_address.of(peer, forwarded_for))
            if wait:
                raise Refusal(
                    errors.RATE_LIMITED,
                    "Too many requests from this address.",
                    wait,
                    reason="ip_rate",
                )
        return Ingress(forward, session, content_type)

    # 4. Admit

    def admit(self, record: RequestRecord, endpoint: Endpoint, key: ApiKey, out: Outgoing) -> None:
        """Reserve the most the request can use: its prompt plus the cap on its output
        (`max_tokens` and its kin, for every sequence the upstream will generate). Free
        routes reserve nothing but still count against request limits."""
        if not endpoint.metered:
            record.admission = self.quota.admit(key, 0, 0)
            return
        output = 0
        if endpoint.output_fields:
            output = self.settings.default_reserve
            for name in endpoint.output_fields:
                value = out.fields.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    output = value
                    break
        elif endpoint.body is Body.MULTIPART:
            output = self.settings.default_reserve  # a transcript's length is not asked for
        if endpoint.body is Body.JSON:
            record.prompt_estimate = estimate_prompt_tokens(out.body)
        record.admission = self.quota.admit(key, record.prompt_estimate, out.choices * output)

    # 5. Route

    def route(
        self, record: RequestRecord, out: Outgoing, affinity: str | None, path: str
    ) -> Upstream:
        """A replica for the request: one serving the model as vLLM names it, else one
        serving the model's fallback (the request then says so, and names that model);
        for `GET /v1/responses/{id}` and its cancel, the replica that stored it."""
        if path.startswith(RESPONSES_PREFIX):
            home = self._response_homes.get(endpoints.response_id(path))
            if home is not None and home.available() and home.breaker.allow():
                return home
        upstream = self.pool.pick(out.model, affinity, body=out.body)
        if upstream is not None:
            return upstream
        fallback = self.current.models.fallback(record.model)
        if fallback is not None and out.endpoint.body is Body.JSON:
            name = self.current.models.upstream(fallback) or fallback
            upstream = self.pool.pick(name, affinity, body=out.body)
            if upstream is not None:
                record.fallback = fallback
                send_as(out, name)
                return upstream
        raise self.pool.refusal_for(out.model)

    def _remember_response(self, data: bytes, upstream: Upstream) -> None:
        found = _RESPONSE_ID.search(data, 0, 4096)
        if found is not None:
            homes = self._response_homes
            homes[found.group(1).decode()] = upstream
            if len(homes) > RESPONSE_HOMES:
                del homes[next(iter(homes))]

    def _affinity(self, session: str | None, key_name: str) -> str | None:
        mode = self.settings.affinity_mode
        if mode == "off":
            return None
        return key_name if mode == "key" else session

    # 6. Forward (with 7, respond)

    async def forward(
        self,
        record: RequestRecord,
        on_disconnect: Callable[[Callable[[], None] | None], None],
        send: Send,
        write: Write,
        upstream: Upstream,
        out: Outgoing,
        ingress: Ingress,
        affinity: str | None,
    ) -> None:
        """The upstream call, cancelled when the client disconnects. A request that
        failed before any response byte (connection refused or dropped before an
        answer, or a 502/503 from a failing or draining replica) is sent once more, to
        another replica; a timeout is not retried (the replica may be generating), nor
        is anything after the response started."""
        headers = ingress.forward
        if self.settings.upstream_authorization:
            headers["authorization"] = self.settings.upstream_authorization
        if out.content_type:
            headers["content-type"] = out.content_type
        task = asyncio.current_task()
        assert task is not None

        def client_left() -> None:
            if record.phase in (Phase.RECEIVING, Phase.RESPONDING):
                record.phase = Phase.ABANDONED
                task.cancel()

        on_disconnect(client_left)
        retried = False
        attempt: Attempt | None = None
        try:
            while True:
                attempt = self.pool.attempt(upstream, out.body)
                outcome = Outcome.ABANDONED
                can_retry = not retried and len(self.pool.upstreams) > 1
                try:
                    outcome = await self._attempt(
                        record, send, write, attempt, out, headers, can_retry
                    )
                    return
                except UpstreamFailure as failure:
                    outcome = failure.outcome
                    if failure.retryable:
                        record.awaiting_usage = False  # the replica never took it on
                    other = (
                        None
                        if retried or not failure.retryable
                        else self._other(out, upstream, affinity)
                    )
                    if other is None:
                        raise _refusal_for_failure(failure) from None
                    retried, upstream = True, other
                finally:
                    record.upstream_seconds += attempt.waited
                    attempt.finish(outcome)
        except asyncio.CancelledError:
            if record.phase is not Phase.ABANDONED:
                raise
            task.uncancel()
        finally:
            on_disconnect(None)

    def _other(self, out: Outgoing, failed: Upstream, affinity: str | None) -> Upstream | None:
        other = self.pool.pick(out.model, affinity, exclude=failed, body=out.body)
        if other is not None:
            self.pool.retries += 1
        return other

    async def _attempt(
        self,
        record: RequestRecord,
        send: Send,
        write: Write,
        attempt: Attempt,
        out: Outgoing,
        headers: dict[str, str],
        can_retry: bool,
    ) -> Outcome:
        """One try: its outcome, or `UpstreamFailure` (retryable ones before any byte)."""
        trace = record.trace
        if trace is not None:
            trace.start_upstream(attempt.upstream.base + out.target, headers)
        timeout = self.settings.timeout_stream if record.stream else self.settings.timeout_whole
        # From here the replica may spend tokens on the request before it says how many.
        record.awaiting_usage = out.endpoint.metered
        status, content_type = await attempt.send(
            out.endpoint.method, out.target, out.body, headers, timeout
        )
        record.upstream_status = status
        if trace is not None:
            trace.end_upstream(status)
        if status in (502, 503) and can_retry:
            # A failing or draining replica that did not take the request: another may.
            raise UpstreamFailure(Outcome.STATUS_5XX, f"status {status}", retryable=True)
        if status == 200 and content_type.startswith("text/event-stream"):
            return await self._stream(record, send, write, attempt, content_type, out)
        return await self._whole(record, send, attempt, status, content_type, out)

    async def _whole(
        self,
        record: RequestRecord,
        send: Send,
        attempt: Attempt,
        status: int,
        content_type: str,
        out: Outgoing,
    ) -> Outcome:
        """7. A whole answer: read it all, count its usage, pass it on."""
        payload = await attempt.read()
        record.awaiting_usage = False  # whatever it used, the answer says (or nothing)
        outcome = Outcome.STATUS_5XX if status >= 500 else Outcome.SUCCEEDED
        if status == 200 and out.endpoint.metered:
            record.usage = usage_from_body(payload, out.endpoint.usage_key)
            if out.endpoint.route == "/v1/responses":
                self._remember_response(payload, attempt.upstream)
        elif status in (401, 403):
            log.error(
                "the upstream refused the gateway's credentials",
                extra={
                    "event": "upstream_credentials",
                    "status": status,
                    "upstream": attempt.upstream.name,
                    "request_id": record.request_id,
                },
            )
            record.upstream_error = "credentials"
            raise Refusal(errors.UPSTREAM_ERROR, "The upstream refused the gateway's request.")
        elif status >= 400 and not errors.is_openai_error(payload):
            record.upstream_error = outcome.value if outcome.is_failure else None
            raise Refusal(
                ErrorKind(status, "upstream_error", "upstream_error"),
                f"The upstream answered with status {status}.",
            )
        if outcome.is_failure:
            record.upstream_error = outcome.value
        record.status = status
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", b"%d" % len(payload)),
            *record.response_headers(),
        ]
        record.phase = Phase.RESPONDING
        await send({"type": "http.response.start", "status": status, "headers": headers})
        record.phase = Phase.RESPONDED
        await send({"type": "http.response.body", "body": payload})
        return outcome

    async def _stream(
        self,
        record: RequestRecord,
        send: Send,
        write: Write,
        attempt: Attempt,
        content_type: str,
        out: Outgoing,
    ) -> Outcome:
        """7. SSE: each read from the upstream goes to the client as it is parsed, by the
        relay, in the upstream connection's callback; this task only waits for the end
        (and for room, when the client reads slower than the replica writes)."""
        record.status = 200
        record.phase = Phase.RESPONDING
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type.encode()), *record.response_headers()],
            }
        )
        endpoint = out.endpoint
        tap: StreamTap | EventTap
        if endpoint.stream is Stream.RESPONSES_EVENTS:
            tap = EventTap(b"event: response.output_text.delta")
        elif endpoint.stream is Stream.ANTHROPIC_EVENTS:
            tap = EventTap(b"event: content_block_delta")
        else:
            tap = StreamTap(strip_usage=not out.client_wants_usage)
        # Chat streams open each choice with a role-only delta: not a token.
        opening_chunks = out.choices if record.operation == "chat" else 0
        remember = self._remember_response if endpoint.route == "/v1/responses" else None
        relay = _Relay(record, attempt, tap, write, remember)
        broken: UpstreamFailure | None = None
        try:
            while not await attempt.pump(relay):
                # The client's buffer is full: an empty piece waits for room.
                await send({"type": "http.response.body", "body": b"", "more_body": True})
        except UpstreamFailure as failure:
            broken = failure
        except asyncio.CancelledError:
            if record.phase is not Phase.ABANDONED:
                # The drain deadline: end the stream with an error event the SDKs raise.
                message = "The gateway is shutting down; the stream was cut short."
                tail = tap.flush() + _error_event(errors.SHUTTING_DOWN, message)
                record.phase = Phase.CUT
                record.usage = tap.usage
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            raise
        finally:
            record.usage = tap.usage
            record.streamed_chunks = max(0, tap.chunks - opening_chunks)
            record.upstream_seconds -= relay.busy  # (counted in the attempt's wait)
        if tap.usage is not None:
            record.awaiting_usage = False
        tail = tap.flush()
        outcome = Outcome.SUCCEEDED
        if broken is not None:
            outcome = broken.outcome
            record.error = errors.UPSTREAM_STREAM_BROKEN.code
            record.upstream_error = outcome.value
            log.warning(
                "upstream stream broke",
                extra={
                    "event": "upstream_stream_broken",
                    "upstream": attempt.upstream.name,
                    "request_id": record.request_id,
                    "detail": str(broken),
                },
            )
            tail += _error_event(
                errors.UPSTREAM_STREAM_BROKEN, "The upstream stream broke before it ended."
            )
        record.phase = Phase.RESPONDED
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return outcome

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client left; 413 past the limit."""
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body:
                raise Refusal(errors.BODY_TOO_LARGE, self._too_large(), reason="size")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self) -> str:
        limit = self.settings.max_body
        return f"The request body is larger than the gateway's limit of {limit} bytes."


class _Relay:
    """A stream's pieces, from the upstream connection's callback to the client's socket,
    in that callback: what a task wake-up, a generator step and a `send` per piece did.
    Returns whether the client has room for more (else the upstream's reading pauses)."""

    __slots__ = ("attempt", "busy", "record", "remember", "tap", "write")

    def __init__(
        self,
        record: RequestRecord,
        attempt: Attempt,
        tap: StreamTap | EventTap,
        write: Write,
        remember: Callable[[bytes, Upstream], None] | None,
    ) -> None:
        self.record = record
        self.attempt = attempt
        self.tap = tap
        self.write = write
        self.remember = remember  # told the first piece (where a stored response's id is)
        self.busy = 0.0  # seconds spent here: the gateway's, not the replica's

    def __call__(self, data: bytes) -> bool:
        started = perf_counter()
        record = self.record
        if record.ttft_seconds is None:
            record.ttft_seconds = started - record.started
            self.attempt.answered()
            if self.remember is not None:
                self.remember(data, self.attempt.upstream)
        passed = self.tap.feed(data)
        room = self.write(passed) if passed else True
        self.busy += perf_counter() - started
        return room


def _error_event(kind: ErrorKind, message: str) -> bytes:
    return b"data: " + errors.error_body(kind, message) + b"\n\n"


def _refusal_for_failure(failure: UpstreamFailure) -> Refusal:
    """What the client is told of an upstream failure: the kind, never the upstream's
    address or the client library's internals (those go to the log)."""
    outcome = failure.outcome
    log.warning(
        "upstream request failed",
        extra={"event": "upstream_failure", "kind": outcome.value, "detail": str(failure)},
    )
    if outcome is Outcome.TIMEOUT:
        kind, message = errors.UPSTREAM_TIMEOUT, "The upstream did not answer in time."
    elif outcome is Outcome.UNREACHABLE:
        kind, message = errors.UPSTREAM_UNREACHABLE, "The upstream is unreachable."
    elif outcome is Outcome.STATUS_5XX:
        kind = errors.UPSTREAM_ERROR
        message = "The upstream is unavailable (it answered 502/503)."
    else:
        kind, message = errors.UPSTREAM_ERROR, "The upstream connection failed."
    return Refusal(kind, message, upstream_error=outcome.value)
