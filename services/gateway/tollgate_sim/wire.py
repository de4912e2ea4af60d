"""vLLM's OpenAI wire format, byte for byte.

The shapes follow vLLM's OpenAI server as of v0.10.2 to v0.17 (`vllm/entrypoints/openai/`):
pydantic field order, compact separators, `exclude_unset` on chat chunks (so nulls appear
only where vLLM sets them explicitly), `"usage":null` on completion chunks, the usage chunk
with `choices: []`, and `data: [DONE]`. The field order of `usage` is vLLM's:
prompt, total, completion. Output text is a deterministic sequence of words, so tests can
predict it; a prompt costs one token per whitespace-separated word.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from tollgate_sim.knobs import Knobs

WORDS = ("Hello", " from", " the", " tollgate", " simulator", ".", " It", " streams")
LAST_CHUNK = b"0\r\n\r\n"
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param

    def body(self) -> bytes:
        return error(str(self), self.status, self.param)


@dataclass
class Request:
    chat: bool
    stream: bool
    model: str
    max_tokens: int
    prompt_tokens: int
    include_usage: bool
    request_id: str
    created: int


def token(i: int) -> str:
    return WORDS[i % len(WORDS)]


def parse_request(body: bytes, chat: bool, knobs: Knobs, request_id: str | None = None) -> Request:
    """Validate like vLLM does; `request_id` is the client's x-request-id, as vLLM uses it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = data.get("model") or knobs.model
    if model != knobs.model:
        raise BadRequest(f"The model `{model}` does not exist.", 404)
    if chat:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("Field required: messages", param="messages")
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        prompt = data.get("prompt")
        if prompt is None:
            raise BadRequest("Field required: prompt", param="prompt")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
    if max_tokens is None:
        max_tokens = knobs.default_tokens
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens must be at least 1", param="max_tokens")
    stream = bool(data.get("stream"))
    options = data.get("stream_options")
    if options and not stream:
        raise BadRequest("Stream options can only be defined when `stream=True`.")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage", True))
    prefix = "chatcmpl-" if chat else "cmpl-"
    return Request(
        chat=chat,
        stream=stream,
        model=model,
        max_tokens=max_tokens,
        prompt_tokens=max(1, len(text.split())),
        include_usage=include_usage,
        request_id=prefix + (request_id or uuid.uuid4().hex),
        created=int(time.time()),
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _usage(request: Request, completion_tokens: int) -> str:
    prompt = request.prompt_tokens
    total = prompt + completion_tokens
    return (
        f'{{"prompt_tokens":{prompt},"total_tokens":{total},"completion_tokens":{completion_tokens}'
    )


def stream_events(request: Request) -> Iterator[tuple[str, bytes]]:
    """Yield ("head"|"token"|"usage"|"done", `data: …` event bytes) in vLLM's order."""
    head = (
        f'{{"id":"{request.request_id}","object":"'
        f'{"chat.completion.chunk" if request.chat else "text_completion"}",'
        f'"created":{request.created},"model":{_dumps(request.model)},"choices":['
    )
    last = request.max_tokens - 1
    if request.chat:
        role = '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        yield "head", _event(head + role + '"finish_reason":null}],"prompt_token_ids":null}')
        for i in range(request.max_tokens):
            delta = f'{{"index":0,"delta":{{"content":{_dumps(token(i))}}},"logprobs":null,'
            end = (
                '"finish_reason":"length","stop_reason":null,"token_ids":null}]}'
                if i == last
                else '"finish_reason":null,"token_ids":null}]}'
            )
            yield "token", _event(head + delta + end)
    else:
        for i in range(request.max_tokens):
            text = f'{{"index":0,"text":{_dumps(token(i))},"logprobs":null,'
            end = (
                '"finish_reason":"length","stop_reason":null,'
                if i == last
                else '"finish_reason":null,"stop_reason":null,'
            )
            yield (
                "token",
                _event(
                    head + text + end + '"prompt_token_ids":null,"token_ids":null}],"usage":null}'
                ),
            )
    if request.include_usage:
        yield "usage", _event(head + '],"usage":' + _usage(request, request.max_tokens) + "}}")
    yield "done", b"data: [DONE]\n\n"


def _event(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def full_response(request: Request) -> bytes:
    text = _dumps("".join(token(i) for i in range(request.max_tokens)))
    usage = _usage(request, request.max_tokens) + ',"prompt_tokens_details":null}'
    if request.chat:
        choice = (
            f'{{"index":0,"message":{{"role":"assistant","content":{text},"refusal":null,'
            '"annotations":null,"audio":null,"function_call":null,"tool_calls":[],'
            '"reasoning_content":null},"logprobs":null,"finish_reason":"length",'
            '"stop_reason":null,"token_ids":null}'
        )
        tail = ',"prompt_logprobs":null,"prompt_token_ids":null,"kv_transfer_params":null}'
        kind = "chat.completion"
    else:
        choice = (
            f'{{"index":0,"text":{text},"logprobs":null,"finish_reason":"length",'
            '"stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null}'
        )
        tail = ',"kv_transfer_params":null}'
        kind = "text_completion"
    return (
        f'{{"id":"{request.request_id}","object":"{kind}","created":{request.created},'
        f'"model":{_dumps(request.model)},"choices":[{choice}],"service_tier":null,'
        f'"system_fingerprint":null,"usage":{usage}{tail}'
    ).encode()


def models(model: str) -> bytes:
    now = int(time.time())
    card = {
        "id": model,
        "object": "model",
        "created": now,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": 4096,
        "permission": [
            {
                "id": "modelperm-" + uuid.uuid4().hex,
                "object": "model_permission",
                "created": now,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
    return _dumps({"object": "list", "data": [card]}).encode()


def error(message: str, status: int, param: str | None = None) -> bytes:
    kind = _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return _dumps(body).encode()


def response(status: int, body: bytes, keep_alive: bool, content_type: bytes | None) -> bytes:
    head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    head.append(b"server: uvicorn\r\ncontent-length: %d\r\n" % len(body))
    if content_type:
        head.append(b"content-type: " + content_type + b"\r\n")
    if not keep_alive:
        head.append(b"connection: close\r\n")
    return b"".join(head) + b"\r\n" + body


def stream_head(keep_alive: bool) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\n"
        b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
        + (b"" if keep_alive else b"connection: close\r\n")
        + b"\r\n"
    )
