"""The request path of `POST /v1/chat/completions` and `POST /v1/completions`, in order.

This is raw ASGI on purpose: it runs for every request and every streamed chunk, so it
avoids the framework's routing, request objects and middleware (FastAPI serves the other
endpoints). `Proxy.handle` reads top to bottom as the gateway's whole job:

1. ingress: request id, body size (413), client IP and its rate limit (429)
2. authenticate: the key (401), from the one credential the request carries
3. parse: the body as a UTF-8 JSON object (400), the key's model list (403)
4. admit: the key's quota and limits (429), reserving every token the request may use
   (`max_tokens` for each of its `n` / `best_of` sequences)
5. route: a replica serving the model, healthy, its breaker not open (else 404 for a
   model nobody serves, 503 without touching any upstream)
6. forward: the body as bytes (with `stream_options.include_usage` turned on for streams),
   only allow-listed headers, the client's key replaced by `VLLM_API_KEY`; retried once
   on another replica if it failed before any response byte
7. respond: JSON whole, or SSE chunk by chunk as it arrives
8. settle: usage, quota, metrics, trace and one log line, always, also when the client
   leaves, the stream breaks or the drain deadline cuts it
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import aiohttp

from tollgate_gateway import errors
from tollgate_gateway.asgi import Receive, Scope, Send, request_id_for, send_refusal
from tollgate_gateway.errors import ErrorKind, Refusal
from tollgate_gateway.keys import CREDENTIAL_HEADERS, ApiKey, CurrentKeys
from tollgate_gateway.lifecycle import Lifecycle
from tollgate_gateway.quota import QuotaLedger
from tollgate_gateway.ratelimit import ClientAddress, Gcra
from tollgate_gateway.record import Phase, RequestRecord
from tollgate_gateway.sse import StreamTap
from tollgate_gateway.upstream import Attempt, Outcome, Upstream, UpstreamFailure, UpstreamPool
from tollgate_gateway.usage import estimate_prompt_tokens, usage_from_body

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is on
    from tollgate_gateway.tracing import Tracing

log = logging.getLogger("tollgate.proxy")

PROXY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
CHAT = "/v1/chat/completions"

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
_STREAM_USAGE = b',"stream_options":{"include_usage":true}}'
# vLLM's own cap on `n` (and `best_of`): anything above is refused before admission.
MAX_CHOICES = 128


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
    timeout_whole: aiohttp.ClientTimeout
    timeout_stream: aiohttp.ClientTimeout


@dataclass(slots=True)
class Ingress:
    """What one pass over the request headers found."""

    forward: dict[str, str]
    session: str | None


class Proxy:
    def __init__(
        self,
        settings: ProxySettings,
        keys: CurrentKeys,
        ip_limit: Gcra | None,
        client_address: ClientAddress,
        quota: QuotaLedger,
        pool: UpstreamPool,
        lifecycle: Lifecycle,
        tracer: Tracing | None,
        settle: Callable[[RequestRecord], None],
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.ip_limit = ip_limit
        self.client_address = client_address
        self.quota = quota
        self.pool = pool
        self.lifecycle = lifecycle
        self.tracer = tracer
        self._settle = settle

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = RequestRecord(route=scope["path"], started=perf_counter())
        if self.tracer is not None:
            record.trace = self.tracer.begin(record.route, scope["headers"])
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
            key = self.keys.ring.authenticate(scope["headers"])
            record.key_name = key.name
            if record.trace is not None:
                record.trace.mark("auth")
            body = await self._read_body(receive)
            if body is None:
                record.phase = Phase.ABANDONED
                return
            data = self.parse(record, key, body)
            choices = self.admit(record, key, data, body)
            if record.admission is not None and record.admission.confirm:
                await self.quota.confirm(key, record.admission)
            body, client_wants_usage = _with_stream_usage(record, data, body)
            affinity = self._affinity(ingress.session, key.name)
            upstream = self.route(record.model, affinity)
            await self.forward(
                record,
                receive,
                send,
                upstream,
                body,
                ingress,
                affinity,
                choices,
                client_wants_usage,
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
        request_id = length = forwarded_for = session = None
        forward: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
                continue
            if name == b"content-length":
                length = value
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
        return Ingress(forward, session)

    # 3. Parse

    def parse(self, record: RequestRecord, key: ApiKey, body: bytes) -> dict[str, Any]:
        data = parse_body(body)
        model = data.get("model")
        record.model = model if isinstance(model, str) else None
        record.stream = data.get("stream") is True
        if not key.may_use(record.model):
            raise Refusal(
                errors.MODEL_NOT_ALLOWED,
                f"This API key may not use model {record.model!r}; allowed: "
                + ", ".join(sorted(key.models or ())),
                reason="model",
                param="model",
            )
        return data

    # 4. Admit

    def admit(self, record: RequestRecord, key: ApiKey, data: dict[str, Any], body: bytes) -> int:
        """Reserve the most the request can use: its prompt plus `max_tokens` for every
        sequence the upstream will generate (`n`, or `best_of` when larger). Returns
        that number of sequences."""
        choices = max(_count(data, "n"), _count(data, "best_of"))
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            max_tokens = self.settings.default_reserve
        record.prompt_estimate = estimate_prompt_tokens(body)
        record.admission = self.quota.admit(key, record.prompt_estimate, choices * max_tokens)
        return choices

    # 5. Route

    def route(self, model: str | None, affinity: str | None) -> Upstream:
        upstream = self.pool.pick(model, affinity)
        if upstream is None:
            raise self.pool.refusal_for(model)
        return upstream

    def _affinity(self, session: str | None, key_name: str) -> str | None:
        mode = self.settings.affinity_mode
        if mode == "off":
            return None
        return key_name if mode == "key" else session

    # 6. Forward (with 7, respond)

    async def forward(
        self,
        record: RequestRecord,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        body: bytes,
        ingress: Ingress,
        affinity: str | None,
        choices: int,
        client_wants_usage: bool,
    ) -> None:
        """The upstream call, cancelled when the client disconnects. A request that
        failed before any response byte (connection refused or dropped before an
        answer, or a 502/503 from a failing or draining replica) is sent once more, to
        another replica; a timeout is not retried (the replica may be generating), nor
        is anything after the response started."""
        headers = ingress.forward
        if self.settings.upstream_authorization:
            headers["authorization"] = self.settings.upstream_authorization
        headers["content-type"] = "application/json"
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, record, task))
        retried = False
        attempt: Attempt | None = None
        try:
            while True:
                attempt = self.pool.attempt(upstream)
                outcome = Outcome.ABANDONED
                can_retry = not retried and len(self.pool.upstreams) > 1
                try:
                    outcome = await self._attempt(
                        record, send, attempt, body, headers, choices, client_wants_usage, can_retry
                    )
                    return
                except UpstreamFailure as failure:
                    outcome = failure.outcome
                    if failure.retryable:
                        record.awaiting_usage = False  # the replica never took it on
                    other = (
                        None
                        if retried or not failure.retryable
                        else self._other(record, upstream, affinity)
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
            watcher.cancel()

    def _other(
        self, record: RequestRecord, failed: Upstream, affinity: str | None
    ) -> Upstream | None:
        other = self.pool.pick(record.model, affinity, exclude=failed)
        if other is not None:
            self.pool.retries += 1
        return other

    async def _attempt(
        self,
        record: RequestRecord,
        send: Send,
        attempt: Attempt,
        body: bytes,
        headers: dict[str, str],
        choices: int,
        client_wants_usage: bool,
        can_retry: bool,
    ) -> Outcome:
        """One try: its outcome, or `UpstreamFailure` (retryable ones before any byte)."""
        trace = record.trace
        if trace is not None:
            trace.start_upstream(attempt.upstream.base + record.route, headers)
        timeout = self.settings.timeout_stream if record.stream else self.settings.timeout_whole
        # From here the replica may spend tokens on the request before it says how many.
        record.awaiting_usage = True
        status, content_type = await attempt.send(record.route, body, headers, timeout)
        record.upstream_status = status
        if trace is not None:
            trace.end_upstream(status)
        if status in (502, 503) and can_retry:
            # A failing or draining replica that did not take the request: another may.
            raise UpstreamFailure(Outcome.STATUS_5XX, f"status {status}", retryable=True)
        if status == 200 and content_type.startswith("text/event-stream"):
            return await self._stream(
                record, send, attempt, content_type, choices, client_wants_usage
            )
        return await self._whole(record, send, attempt, status, content_type)

    async def _whole(
        self, record: RequestRecord, send: Send, attempt: Attempt, status: int, content_type: str
    ) -> Outcome:
        """7. A JSON answer: read it all, count its usage, pass it on."""
        payload = await attempt.read()
        record.awaiting_usage = False  # whatever it used, the answer says (or nothing)
        outcome = Outcome.STATUS_5XX if status >= 500 else Outcome.SUCCEEDED
        if status == 200:
            record.usage = usage_from_body(payload)
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
            (b"x-request-id", record.request_id.encode()),
            (b"x-tollgate-overhead-ms", record.overhead_header()),
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
        attempt: Attempt,
        content_type: str,
        choices: int,
        client_wants_usage: bool,
    ) -> Outcome:
        """7. SSE: each read from the upstream goes to the client before the next read."""
        record.status = 200
        record.phase = Phase.RESPONDING
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"x-request-id", record.request_id.encode()),
                    (b"x-tollgate-overhead-ms", record.overhead_header()),
                ],
            }
        )
        tap = StreamTap(strip_usage=not client_wants_usage)
        # Chat streams open each choice with a role-only delta: not a token.
        opening_chunks = choices if record.route == CHAT else 0
        broken: UpstreamFailure | None = None
        try:
            async for data in attempt.chunks():
                if record.ttft_seconds is None:
                    record.ttft_seconds = perf_counter() - record.started
                out = tap.feed(data)
                record.streamed_chunks = max(0, tap.chunks - opening_chunks)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
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


def parse_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; a clear 400 for anything else (JSON bodies are UTF-8:
    a UTF-16 one would be corrupted by the bytes the gateway splices in)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(
            errors.INVALID_ENCODING,
            "The request body must be UTF-8 encoded JSON.",
            reason="invalid",
        ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Refusal(
            errors.INVALID_JSON, f"The request body is not valid JSON: {exc}", reason="invalid"
        ) from None
    except RecursionError:
        raise Refusal(
            errors.INVALID_JSON, "The request body is nested too deeply.", reason="invalid"
        ) from None
    if not isinstance(data, dict):
        raise Refusal(
            errors.INVALID_JSON, "The request body must be a JSON object.", reason="invalid"
        )
    if "stream" in data and not isinstance(data["stream"], bool):
        raise Refusal(
            errors.INVALID_REQUEST,
            "'stream' must be a boolean.",
            reason="invalid",
            param="stream",
        )
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise Refusal(
            errors.INVALID_REQUEST,
            "'stream_options' must be an object.",
            reason="invalid",
            param="stream_options",
        )
    return data


def _count(data: dict[str, Any], name: str) -> int:
    """`n` or `best_of`: absent means 1; anything but an integer 1..MAX_CHOICES is a 400."""
    value = data.get(name)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHOICES:
        raise Refusal(
            errors.INVALID_REQUEST,
            f"'{name}' must be an integer from 1 to {MAX_CHOICES}.",
            reason="invalid",
            param=name,
        )
    return value


def _with_stream_usage(
    record: RequestRecord, data: dict[str, Any], body: bytes
) -> tuple[bytes, bool]:
    """Streams always ask the upstream for usage; the client sees it only if it asked."""
    if not record.stream:
        return body, True
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, True
    if "stream_options" not in data:
        return body[: body.rstrip().rfind(b"}")] + _STREAM_USAGE, False
    data["stream_options"] = {**(options or {}), "include_usage": True}
    return json.dumps(data, ensure_ascii=False).encode(), False


def _error_event(kind: ErrorKind, message: str) -> bytes:
    return b"data: " + errors.error_body(kind, message) + b"\n\n"


async def _watch_disconnect(
    receive: Receive, record: RequestRecord, task: asyncio.Task[Any]
) -> None:
    """Cancel the request's task when its client disconnects before the answer ended."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if record.phase in (Phase.RECEIVING, Phase.RESPONDING):
                record.phase = Phase.ABANDONED
                task.cancel()
            return


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
