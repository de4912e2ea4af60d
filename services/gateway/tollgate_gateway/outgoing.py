"""The request as it goes upstream: its body parsed (JSON, or a multipart upload's few
text fields), checked, and changed only where the gateway must: asking a stream for its
usage, and sending a configured model name as the name vLLM serves.

Everything here refuses with a 400 (or 403 for a model the key may not use) before any
quota is reserved or any upstream is chosen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tollgate_gateway import errors, multipart
from tollgate_gateway.asgi import Scope
from tollgate_gateway.endpoints import Body, Endpoint
from tollgate_gateway.errors import Refusal
from tollgate_gateway.keys import ApiKey
from tollgate_gateway.models import ModelRoutes
from tollgate_gateway.record import RequestRecord

_FORM_FIELDS = frozenset({"model", "stream", "stream_include_usage"})
_STREAM_USAGE = b',"stream_options":{"include_usage":true}}'
# vLLM's own cap on `n` (and `best_of`): anything above is refused before admission.
MAX_CHOICES = 128


@dataclass(slots=True)
class Outgoing:
    """The request as it goes upstream."""

    endpoint: Endpoint
    # The path and query the client asked for (the endpoint's route, parameters filled).
    target: str
    body: bytes
    content_type: str
    # Sequences the upstream generates (n / best_of).
    choices: int = 1
    client_wants_usage: bool = True
    # The body's fields the gateway read (JSON, or the multipart text fields).
    fields: dict[str, Any] = field(default_factory=dict)
    # The model as the upstream names it (an alias resolved).
    model: str | None = None


def prepare(
    record: RequestRecord,
    endpoint: Endpoint,
    key: ApiKey,
    scope: Scope,
    content_type: bytes | None,
    body: bytes,
    models: ModelRoutes,
) -> Outgoing:
    """Step 3, parse: what goes upstream. The body as it came, except that a stream of
    OpenAI chunks always asks for its usage (the client sees it only if it asked too) and
    a model name the configuration maps is sent as the name vLLM serves."""
    target = scope["path"]
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    out = Outgoing(endpoint, target, body, "application/json")
    fields: dict[str, Any] = {}
    if endpoint.body is Body.JSON:
        fields = parse_body(body)
        record.stream = fields.get("stream") is True
        if record.stream and endpoint.streamed_usage_injected:
            out.body, out.client_wants_usage = _with_stream_usage(fields, body)
        if endpoint.choices:
            out.choices = max(_count(fields, "n"), _count(fields, "best_of"))
    elif endpoint.body is Body.MULTIPART:
        boundary = multipart.boundary_of(content_type)
        fields = multipart.form_fields(body, boundary, _FORM_FIELDS)
        out.content_type = (content_type or b"").decode("latin-1")
        record.stream = fields.get("stream", "").lower() == "true"
        if record.stream and fields.get("stream_include_usage", "").lower() != "true":
            out.body = multipart.with_field(body, boundary, "stream_include_usage", "true")
            out.client_wants_usage = False
    else:
        out.content_type = ""
    model = fields.get("model")
    record.model = model if isinstance(model, str) else None
    if endpoint.body is not Body.NONE and not key.may_use(record.model):
        raise Refusal(
            errors.MODEL_NOT_ALLOWED,
            f"This API key may not use model {record.model!r}; allowed: "
            + ", ".join(sorted(key.models or ())),
            reason="model",
            param="model",
        )
    out.fields = fields
    out.model = models.upstream(record.model)
    if out.model != record.model and endpoint.body is Body.JSON and out.model is not None:
        send_as(out, out.model)
    if record.trace is not None:
        record.trace.describe_request(fields)
    return out


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


def _with_stream_usage(data: dict[str, Any], body: bytes) -> tuple[bytes, bool]:
    """An OpenAI chunk stream always asks the upstream for usage; the body, and whether
    the client asked too (else the usage chunk is stripped again on the way back)."""
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, True
    if "stream_options" not in data:
        return body[: body.rstrip().rfind(b"}")] + _STREAM_USAGE, False
    data["stream_options"] = {**(options or {}), "include_usage": True}
    return json.dumps(data, ensure_ascii=False).encode(), False


def send_as(out: Outgoing, model: str) -> None:
    """Send a JSON request upstream under another model name (an alias, a fallback)."""
    fields = {**out.fields, "model": model}
    if not out.client_wants_usage:
        fields["stream_options"] = {**(fields.get("stream_options") or {}), "include_usage": True}
    out.model = model
    out.body = json.dumps(fields, ensure_ascii=False).encode()
