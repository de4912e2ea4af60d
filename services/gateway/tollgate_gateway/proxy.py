"""The request path of `POST /v1/chat/completions` and `POST /v1/completions`, in order.

This is raw ASGI on purpose: it runs for every request and every streamed chunk, so it
avoids the framework's routing, request objects and middleware (FastAPI serves the other
endpoints). Read `_handle` top to bottom: it is the gateway's whole job.

1. ingress: request id, body size (413), client IP and its rate limit (429)
2. the key (401), the body as JSON (400), the key's model list (403)
3. the key's quota and limits (429), reserving the tokens the request may use
4. `stream_options.include_usage` turned on for streams, so usage can be counted
5. a replica serving the model, healthy, its circuit breaker not open (else 404 for a
   model nobody serves, 503 without touching any upstream)
6. upstream call: the body as bytes, the client's headers less hop-by-hop ones, the
   client's key replaced by `VLLM_API_KEY`; retried once on another replica if it failed
   before any response byte
7. response: JSON whole, or SSE chunk by chunk as it arrives
8. usage settled and one log line, always, also when the client leaves or the stream breaks
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any

import aiohttp

from tollgate_gateway import errors
from tollgate_gateway.asgi import Receive, Scope, Send, send_error
from tollgate_gateway.errors import ErrorKind
from tollgate_gateway.exchange import Exchange
from tollgate_gateway.quota import Refusal
from tollgate_gateway.sse import StreamTap
from tollgate_gateway.upstream import Upstream, UpstreamPool
from tollgate_gateway.usage import Usage, estimate_prompt_tokens, usage_from_body

if TYPE_CHECKING:
    from tollgate_gateway.app import Gateway

log = logging.getLogger("tollgate.proxy")

PROXY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

# Never forwarded upstream: hop-by-hop headers (RFC 9110 7.6.1), the ones the gateway sets
# itself, and accept-encoding (usage is read from the response bytes, so no compression).
_NOT_FORWARDED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"content-type",
        b"authorization",
        b"accept-encoding",
        b"expect",
        b"x-request-id",
    }
)
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_STREAM_USAGE = b',"stream_options":{"include_usage":true}}'
_UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)
# Failures where the replica cannot have started on the request: safe to send elsewhere.
_RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)


class Reject(Exception):
    """A request answered with an error before any response byte was sent: refused by the
    gateway itself (`reason`, for metrics), or failed at the upstream (`upstream`)."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        retry_after: float | None = None,
        *,
        reason: str | None = None,
        upstream: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.reason = reason
        self.upstream = upstream
        self.headers: list[tuple[bytes, bytes]] = []
        if retry_after is not None:
            self.headers.append((b"retry-after", b"%d" % max(1, round(retry_after))))


class Proxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.max_body = gateway.settings.gateway_max_body_bytes
        self.default_reserve = gateway.settings.quota_default_reserve_tokens
        self.affinity_mode = gateway.settings.gateway_session_affinity
        self.affinity_header = gateway.settings.gateway_session_header.lower()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(route=scope["path"], started=perf_counter())
        if self.gateway.tracing is not None:
            ex.trace = self.gateway.tracing.begin(ex.route, scope["headers"])
        self.gateway.inflight += 1
        try:
            await self._handle(ex, scope, receive, send)
        except Reject as reject:
            ex.status, ex.error = reject.kind.status, reject.kind.code
            ex.rejection = reject.reason
            ex.upstream_error = reject.upstream or ex.upstream_error
            await send_error(send, reject.kind, reject.message, ex.request_id, reject.headers)
        except Exception:
            log.exception("unexpected error", extra={"request_id": ex.request_id})
            ex.status, ex.error = 500, errors.INTERNAL.code
            if not ex.response_started:
                await send_error(send, errors.INTERNAL, "Internal gateway error.", ex.request_id)
        finally:
            self.gateway.inflight -= 1
            self.gateway.finish(ex)

    async def _handle(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        # 1. Ingress: one pass over the headers.
        authorization = request_id = length = connection = forwarded_for = None
        forward: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                forwarded_for = value
            if name in _NOT_FORWARDED:
                if name == b"authorization":
                    authorization = value
                elif name == b"x-request-id":
                    request_id = value
                elif name == b"content-length":
                    length = value
                elif name == b"connection":
                    connection = value
                continue
            forward[name.decode("latin-1")] = value.decode("latin-1")
        if connection:
            for token in connection.decode("latin-1").lower().split(","):
                forward.pop(token.strip(), None)
        if request_id is not None and _REQUEST_ID.match(request_id):
            ex.request_id = request_id.decode()
        else:
            ex.request_id = os.urandom(16).hex()  # uuid4().hex's format, a third of its cost

        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise Reject(errors.BODY_TOO_LARGE, self._too_large(), reason="size")
        if gw.ip_limit is not None:
            peer = scope["client"][0] if scope.get("client") else ""
            wait = gw.ip_limit.check(gw.client_address.of(peer, forwarded_for))
            if wait:
                raise Reject(
                    errors.RATE_LIMITED,
                    "Too many requests from this address.",
                    wait,
                    reason="ip_rate",
                )

        # 2. Who is asking, for what.
        key = gw.keys.authenticate(authorization)
        if key is None:
            raise Reject(
                errors.INVALID_API_KEY,
                "Incorrect API key provided."
                if authorization
                else "Missing API key: send it as 'Authorization: Bearer <key>'.",
                reason="auth",
            )
        refusal = key.refusal(time.time())
        if refusal is not None:
            raise Reject(errors.INVALID_API_KEY, refusal, reason="auth")
        ex.key_name = key.name
        if ex.trace is not None:
            ex.trace.mark("auth")

        body = await self._read_body(receive)
        if body is None:
            ex.client_gone = True
            return
        data = _parse(body)
        model = data.get("model")
        ex.model = model if isinstance(model, str) else None
        if key.models is not None and ex.model not in key.models:
            raise Reject(
                errors.MODEL_NOT_ALLOWED,
                f"This API key may not use model {ex.model!r}; allowed: "
                + ", ".join(sorted(key.models)),
                reason="model",
            )

        # 3. Quota and per-key limits; the reservation is settled in Gateway.finish.
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            max_tokens = self.default_reserve
        admitted = gw.quota.admit(key, estimate_prompt_tokens(body) + max_tokens)
        if isinstance(admitted, Refusal):
            raise Reject(
                admitted.kind, admitted.message, admitted.retry_after, reason=admitted.reason
            )
        ex.admission = admitted

        # 4. Streams always ask the upstream for usage; the client sees it only if it asked.
        stream = data.get("stream", False)
        ex.stream = stream is True
        client_wants_usage = True
        if ex.stream:
            options = data.get("stream_options")
            client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
            if not client_wants_usage:
                if "stream_options" not in data:
                    body = body[: body.rstrip().rfind(b"}")] + _STREAM_USAGE
                else:
                    data["stream_options"] = {**(options or {}), "include_usage": True}
                    body = json.dumps(data, ensure_ascii=False).encode()

        # 5. A replica serving the model, skipping unhealthy and open-breaker ones.
        pool = gw.upstreams
        affinity = self._affinity(forward, key.name)
        upstream = pool.pick(ex.model, affinity)
        if upstream is None:
            raise _no_upstream(pool, ex.model)

        # 6. Upstream call, cancelled when the client disconnects.
        if pool.authorization:
            forward["authorization"] = pool.authorization
        forward["content-type"] = "application/json"
        forward["x-request-id"] = ex.request_id
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, ex, task))
        try:
            await self._exchange(ex, send, upstream, body, forward, client_wants_usage, affinity)
        except asyncio.CancelledError:
            if not ex.client_gone:
                raise
            task.uncancel()
            if ex.upstream is not None:
                ex.upstream.breaker.release()
        finally:
            watcher.cancel()
        if ex.usage is None and ex.streamed_chunks:
            # 8. A stream that broke (or was abandoned) before its usage chunk.
            chat = ex.route == "/v1/chat/completions"
            ex.usage = Usage(
                prompt_tokens=estimate_prompt_tokens(body),
                completion_tokens=max(0, ex.streamed_chunks - (1 if chat else 0)),
                exact=False,
            )

    def _affinity(self, forward: dict[str, str], key_name: str) -> str | None:
        mode = self.affinity_mode
        if mode == "off":
            return None
        return key_name if mode == "key" else forward.get(self.affinity_header)

    async def _exchange(
        self,
        ex: Exchange,
        send: Send,
        upstream: Upstream,
        body: bytes,
        headers: dict[str, str],
        client_wants_usage: bool,
        affinity: str | None,
    ) -> None:
        """One attempt, or two: a request that failed before any response byte (connection
        refused or dropped before an answer, or a 502/503 from a failing or draining
        replica) is sent once more, to another replica. A timeout is not retried (the
        replica may be generating), nor is anything after the response started."""
        pool = self.gateway.upstreams
        assert pool.session is not None
        timeout = pool.timeout_stream if ex.stream else pool.timeout_full
        attempt: Upstream | None = upstream
        while attempt is not None:
            current, attempt = attempt, None
            ex.upstream = current
            url = current.url[ex.route]
            if ex.trace is not None:
                ex.trace.start_upstream(str(url), headers)
            current.inflight += 1
            current.requests += 1
            try:
                sent_at = perf_counter()
                try:
                    resp = await pool.session.post(url, data=body, headers=headers, timeout=timeout)
                except _UPSTREAM_ERRORS as exc:
                    ex.upstream_seconds += perf_counter() - sent_at
                    current.breaker.failure()
                    if isinstance(exc, _RETRYABLE):
                        attempt = self._retry(ex, current, affinity)
                    if attempt is None:
                        raise _upstream_reject(exc) from None
                    continue
                ex.upstream_seconds += perf_counter() - sent_at
                if ex.trace is not None:
                    ex.trace.end_upstream(resp.status)
                ex.upstream_status = resp.status
                if resp.status in (502, 503):
                    attempt = self._retry(ex, current, affinity)
                    if attempt is not None:
                        current.breaker.failure()
                        resp.close()
                        continue
                try:
                    if resp.status == 200 and resp.content_type == "text/event-stream":
                        await self._stream(ex, send, resp, client_wants_usage)
                    else:
                        await self._whole(ex, send, resp)
                finally:
                    resp.release() if ex.completed else resp.close()
            finally:
                current.inflight -= 1

    def _retry(self, ex: Exchange, failed: Upstream, affinity: str | None) -> Upstream | None:
        if ex.retried:
            return None
        other = self.gateway.upstreams.pick(ex.model, affinity, exclude=failed)
        if other is not None:
            ex.retried = True
            self.gateway.upstreams.retries += 1
        return other

    async def _whole(self, ex: Exchange, send: Send, resp: aiohttp.ClientResponse) -> None:
        """7. A JSON answer: read it all, count its usage, pass it on."""
        assert ex.upstream is not None
        breaker = ex.upstream.breaker
        started = perf_counter()
        try:
            payload = await resp.read()
        except _UPSTREAM_ERRORS as exc:
            breaker.failure()
            raise _upstream_reject(exc) from None
        ex.upstream_seconds += perf_counter() - started
        ex.completed = True
        status = resp.status
        if status >= 500:
            breaker.failure()
            ex.upstream_error = "status_5xx"
        else:
            breaker.success()
        if status == 200:
            ex.usage = usage_from_body(payload)
        elif status in (401, 403):
            raise Reject(
                errors.UPSTREAM_ERROR,
                f"The upstream refused the gateway's credentials ({status}); check VLLM_API_KEY.",
                upstream="credentials",
            )
        elif status >= 400 and not errors.is_openai_error(payload):
            kind = ErrorKind(status, "upstream_error", "upstream_error")
            raise Reject(kind, f"The upstream answered {status} {resp.reason or ''}".strip())
        ex.status = status
        headers = [
            (b"content-type", resp.headers.get("content-type", "application/json").encode()),
            (b"content-length", str(len(payload)).encode()),
            (b"x-request-id", ex.request_id.encode()),
            (b"x-tollgate-overhead-ms", ex.overhead_header()),
        ]
        ex.response_started = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        ex.responded = True
        await send({"type": "http.response.body", "body": payload})

    async def _stream(
        self, ex: Exchange, send: Send, resp: aiohttp.ClientResponse, client_wants_usage: bool
    ) -> None:
        """7. SSE: each read from the upstream goes to the client before the next read."""
        assert ex.upstream is not None
        breaker = ex.upstream.breaker
        ex.status = 200
        ex.response_started = True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", resp.headers["content-type"].encode()),
                    (b"x-request-id", ex.request_id.encode()),
                    (b"x-tollgate-overhead-ms", ex.overhead_header()),
                ],
            }
        )
        tap = StreamTap(strip_usage=not client_wants_usage)
        broken: BaseException | None = None
        waiting_since = perf_counter()
        try:
            async for data in resp.content.iter_any():
                now = perf_counter()
                ex.upstream_seconds += now - waiting_since
                if ex.ttft_seconds is None:
                    ex.ttft_seconds = now - ex.started
                out = tap.feed(data)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                waiting_since = perf_counter()
        except _UPSTREAM_ERRORS as exc:
            broken = exc
        finally:
            ex.streamed_chunks = tap.chunks
            ex.usage = tap.usage
        tail = tap.flush()
        if broken is not None:
            breaker.failure()
            ex.error = errors.UPSTREAM_STREAM_BROKEN.code
            ex.upstream_error = "stream_broken"
            message = f"The upstream stream broke: {_describe(broken)}"
            tail += b"data: " + errors.error_body(errors.UPSTREAM_STREAM_BROKEN, message) + b"\n\n"
        else:
            breaker.success()
            ex.completed = True
        ex.responded = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})

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
            if size > self.max_body:
                raise Reject(errors.BODY_TOO_LARGE, self._too_large(), reason="size")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self) -> str:
        return f"The request body is larger than the gateway's limit of {self.max_body} bytes."


def _parse(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Reject(
            errors.INVALID_JSON, f"The request body is not valid JSON: {exc}", reason="invalid"
        ) from None
    if not isinstance(data, dict):
        raise Reject(
            errors.INVALID_JSON, "The request body must be a JSON object.", reason="invalid"
        )
    if "stream" in data and not isinstance(data["stream"], bool):
        raise Reject(errors.INVALID_REQUEST, "'stream' must be a boolean.", reason="invalid")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise Reject(
            errors.INVALID_REQUEST, "'stream_options' must be an object.", reason="invalid"
        )
    return data


async def _watch_disconnect(receive: Receive, ex: Exchange, task: asyncio.Task[Any]) -> None:
    """Cancel the request's task when its client disconnects before the answer ended."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not ex.responded:
                ex.client_gone = True
                task.cancel()
            return


def _no_upstream(pool: UpstreamPool, model: str | None) -> Reject:
    if not pool.knows_model(model):
        return Reject(
            errors.MODEL_NOT_FOUND,
            f"The model `{model}` does not exist.",
            reason="unknown_model",
        )
    if any(u.healthy and u.serves(model) for u in pool.upstreams):
        return Reject(
            errors.UNAVAILABLE,
            "The upstream is failing; the gateway's circuit breaker is open.",
            pool.retry_after(),
            reason="breaker",
        )
    return Reject(
        errors.NO_UPSTREAM,
        "No healthy upstream serves this model right now.",
        1,
        reason="no_upstream",
    )


def _upstream_reject(exc: BaseException) -> Reject:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return Reject(
            errors.UPSTREAM_TIMEOUT, "The upstream did not answer in time.", upstream="timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Reject(
            errors.UPSTREAM_UNREACHABLE,
            f"The upstream is unreachable: {_describe(exc)}",
            upstream="unreachable",
        )
    return Reject(
        errors.UPSTREAM_ERROR,
        f"The upstream connection failed: {_describe(exc)}",
        upstream="error",
    )


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
