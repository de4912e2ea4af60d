"""Every route the gateway passes on to vLLM, in one table, and nothing else.

vLLM's own `--api-key` protects only some of its paths, and it serves more than a front
door should expose; so the gateway passes on exactly the routes below and refuses every
other path. Each row says how the request path treats that route — one path for all of
them: authentication, per-IP and per-key limits, the model allow-list, quota
reservations, replica choice, retries, the breaker, metrics, logs and traces.

- `operation`: the OpenTelemetry GenAI `gen_ai.operation.name`, and the metrics' and
  logs' operation.
- `body`: JSON, multipart (audio uploads: the model and `stream` are form fields), or
  none (a stored response, by id).
- `stream`: how it streams when the body asks (`stream: true`): OpenAI chunks (usage in a
  last `choices: []` chunk, asked for by the gateway and stripped again if the client did
  not ask), or named events whose usage is always part of the protocol (Responses'
  `response.completed`, Anthropic's `message_start`/`message_delta`).
- `output_fields`: the body fields that cap the output tokens, reserved at admission;
  none for routes that only read their input (embeddings, rerank, score).
- `metered`: whether its tokens count against the key's quotas (tokenizer routes do not;
  they are still authenticated and rate-limited).
- `choices`: whether `n` / `best_of` multiply the output.
- `usage_key`: where a whole answer keeps its usage object.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Body(enum.Enum):
    JSON = "json"
    MULTIPART = "multipart"
    NONE = "none"


class Stream(enum.Enum):
    NONE = "none"
    OPENAI_CHUNKS = "openai_chunks"
    RESPONSES_EVENTS = "responses_events"
    ANTHROPIC_EVENTS = "anthropic_events"


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    # The route as metrics and logs name it; `{id}` marks a path parameter.
    route: str
    operation: str
    body: Body = Body.JSON
    stream: Stream = Stream.NONE
    output_fields: tuple[str, ...] = ()
    metered: bool = True
    choices: bool = False
    # The key of the usage object in a whole answer (Cohere's /v2/embed: meta.tokens).
    usage_key: str = "usage"

    @property
    def streamed_usage_injected(self) -> bool:
        """Whether the gateway must ask the upstream for a stream's usage."""
        return self.stream is Stream.OPENAI_CHUNKS


_CHAT_OUTPUT = ("max_completion_tokens", "max_tokens")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", "/v1/chat/completions", "chat", stream=Stream.OPENAI_CHUNKS,
             output_fields=_CHAT_OUTPUT, choices=True),
    Endpoint("POST", "/v1/completions", "text_completion", stream=Stream.OPENAI_CHUNKS,
             output_fields=("max_tokens",), choices=True),
    Endpoint("POST", "/v1/embeddings", "embeddings"),
    Endpoint("POST", "/v2/embed", "embeddings", usage_key="tokens"),
    Endpoint("POST", "/v1/responses", "responses", stream=Stream.RESPONSES_EVENTS,
             output_fields=("max_output_tokens",)),
    Endpoint("GET", "/v1/responses/{id}", "responses", body=Body.NONE, metered=False),
    Endpoint("POST", "/v1/responses/{id}/cancel", "responses", body=Body.NONE, metered=False),
    Endpoint("POST", "/v1/messages", "messages", stream=Stream.ANTHROPIC_EVENTS,
             output_fields=("max_tokens",)),
    Endpoint("POST", "/v1/messages/count_tokens", "count_tokens", metered=False),
    Endpoint("POST", "/v1/rerank", "rerank"),
    Endpoint("POST", "/v2/rerank", "rerank"),
    Endpoint("POST", "/rerank", "rerank"),
    Endpoint("POST", "/v1/score", "score"),
    Endpoint("POST", "/score", "score"),
    Endpoint("POST", "/v1/audio/transcriptions", "transcription", body=Body.MULTIPART,
             stream=Stream.OPENAI_CHUNKS),
    Endpoint("POST", "/v1/audio/translations", "translation", body=Body.MULTIPART,
             stream=Stream.OPENAI_CHUNKS),
    Endpoint("POST", "/tokenize", "tokenize", metered=False),
    Endpoint("POST", "/detokenize", "detokenize", metered=False),
)  # fmt: skip

_EXACT = {(e.method, e.route): e for e in ENDPOINTS if "{id}" not in e.route}
_BY_PATH = {e.route: e for e in ENDPOINTS if "{id}" not in e.route}
_RESPONSE = {e.method + e.route.removeprefix("/v1/responses/{id}"): e
             for e in ENDPOINTS if e.route.startswith("/v1/responses/{id}")}  # fmt: skip
_RESPONSES_PREFIX = "/v1/responses/"


def match(method: str, path: str) -> tuple[Endpoint | None, bool]:
    """The endpoint for a request, and whether the path is one of the table's at all
    (a known path with another method is a 405, an unknown one a 404)."""
    endpoint = _EXACT.get((method, path))
    if endpoint is not None:
        return endpoint, True
    if path in _BY_PATH:
        return None, True
    if path.startswith(_RESPONSES_PREFIX):
        rest = path[len(_RESPONSES_PREFIX) :]
        response_id, _, tail = rest.partition("/")
        if response_id and tail in ("", "cancel") and "/" not in tail:
            suffix = "/cancel" if tail else ""
            return _RESPONSE.get(method + suffix), True
    return None, False


def response_id(path: str) -> str:
    """The id in `/v1/responses/{id}[/cancel]`."""
    return path[len(_RESPONSES_PREFIX) :].partition("/")[0]
