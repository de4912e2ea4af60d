"""Every route vLLM's OpenAI-compatible server serves (`vllm/entrypoints/openai/api_server.py`
and the routers it includes), mapped to the simulator's handlers. An unknown path is
FastAPI's 404 `{"detail":"Not Found"}`, a known path with another method its 405."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tollgate_sim import audio, messages, models, pooling, responses, tokenization, wire
from tollgate_sim.exchange import Exchange
from tollgate_sim.metrics import metrics

Handler = Callable[[Exchange], Awaitable[None]]

EXACT: dict[bytes, dict[bytes, Handler]] = {
    b"/v1/chat/completions": {b"POST": wire.chat},
    b"/v1/completions": {b"POST": wire.completions},
    b"/v1/embeddings": {b"POST": pooling.embeddings},
    b"/v2/embed": {b"POST": pooling.cohere_embed},
    b"/v1/responses": {b"POST": responses.create},
    b"/v1/messages": {b"POST": messages.create},
    b"/v1/messages/count_tokens": {b"POST": messages.count_tokens},
    b"/rerank": {b"POST": pooling.rerank},
    b"/v1/rerank": {b"POST": pooling.rerank},
    b"/v2/rerank": {b"POST": pooling.rerank},
    b"/score": {b"POST": pooling.score},
    b"/v1/score": {b"POST": pooling.score},
    b"/v1/audio/transcriptions": {b"POST": audio.transcriptions},
    b"/v1/audio/translations": {b"POST": audio.translations},
    b"/tokenize": {b"POST": tokenization.tokenize},
    b"/detokenize": {b"POST": tokenization.detokenize},
    b"/v1/models": {b"GET": models.list_models},
    b"/metrics": {b"GET": metrics},
}
_RESPONSES = b"/v1/responses/"


def find(method: bytes, path: bytes) -> tuple[Handler | None, dict[str, str], bool]:
    """(handler, path parameters, whether the path exists at all)."""
    methods = EXACT.get(path)
    params: dict[str, str] = {}
    if methods is None and path.startswith(_RESPONSES):
        rest = path[len(_RESPONSES) :]
        if rest.endswith(b"/cancel") and rest.count(b"/") == 1:
            methods = {b"POST": responses.cancel}
            rest = rest[: -len(b"/cancel")]
        elif rest and b"/" not in rest:
            methods = {b"GET": responses.retrieve}
        params["id"] = rest.decode("latin-1")
    if methods is None:
        return None, params, False
    return methods.get(method), params, True
