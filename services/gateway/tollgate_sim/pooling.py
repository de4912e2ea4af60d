"""Pooling routes in vLLM's shapes: /v1/embeddings, Cohere's /v2/embed, /score and
/v1/score, /rerank, /v1/rerank and /v2/rerank.

Sources: `vllm/entrypoints/pooling/embed/protocol.py` (EmbeddingResponse: id `embd-…`,
object list, created, model, data[{index, object, embedding}], usage UsageInfo),
`pooling/embed/cohere/protocol.py` (CohereEmbedResponse), `pooling/score/protocol.py`
(ScoreResponse, RerankResponse with usage {total_tokens}). Embeddings are deterministic
unit vectors derived from the input's CRC32; a score is the Jaccard overlap of the two
texts' lower-cased words, so tests can predict both.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
import zlib
from typing import Any

from tollgate_sim.errors import ApiError
from tollgate_sim.exchange import Exchange
from tollgate_sim.generation import Plan, answer
from tollgate_sim.http import dumps
from tollgate_sim.tokens import count_input, is_token_ids, message_text

DIMENSIONS = 16


def vector(value: Any, dimensions: int = DIMENSIONS) -> list[float]:
    seed = zlib.crc32(repr(value).encode())
    raw = [math.sin(seed + 1.7 * j) for j in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _usage(prompt_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def _plan(ex: Exchange, model: str, lora: str | None, tokens: int, rid: str) -> Plan:
    return Plan(model, lora, tokens, 0, False, rid)


def _dimensions(data: dict[str, Any]) -> int:
    value = data.get("dimensions", data.get("output_dimension"))
    if value is None:
        return DIMENSIONS
    if type(value) is not int or value < 1:
        raise ApiError("Dimensions must be greater than 0", param="dimensions")
    return value


async def embeddings(ex: Exchange) -> None:
    data = ex.json()
    model, lora = ex.model(data)
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise ApiError("Field required: messages", param="messages")
        inputs: list[Any] = [message_text(messages)]
    else:
        value = data.get("input")
        if value is None:
            raise ApiError("Field required: input", param="input")
        inputs = value if isinstance(value, list) and not is_token_ids(value) else [value]
        if not inputs or any(i == "" or i == [] for i in inputs):
            raise ApiError("Input cannot be empty.", param="input")
    encoding = data.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(
            f"Input should be 'float' or 'base64', got {encoding!r}", param="encoding_format"
        )
    dims = _dimensions(data)
    items = []
    for index, value in enumerate(inputs):
        vec = vector(value, dims)
        embedding: list[float] | str = vec
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        items.append({"index": index, "object": "embedding", "embedding": embedding})
    tokens = sum(count_input(v) for v in inputs)
    await _list_answer(ex, "embd-", model, lora, items, tokens)


async def cohere_embed(ex: Exchange) -> None:
    data = ex.json()
    model, lora = ex.model(data)
    texts = data.get("texts")
    if texts is None and isinstance(data.get("inputs"), list):
        texts = [
            " ".join(str(c.get("text") or "") for c in item.get("content", []))
            for item in data["inputs"]
            if isinstance(item, dict)
        ]
    if not isinstance(texts, list) or not texts:
        raise ApiError("One of texts, images or inputs must be provided.", param="texts")
    types = data.get("embedding_types") or ["float"]
    dims = _dimensions(data)
    vectors = [vector(t, dims) for t in texts]
    embeddings: dict[str, Any] = {}
    for kind in types:
        if kind == "float":
            embeddings["float"] = vectors
        elif kind == "base64":
            embeddings["base64"] = [
                base64.b64encode(struct.pack(f"<{dims}f", *v)).decode() for v in vectors
            ]
        elif kind in ("binary", "ubinary"):
            if dims % 8:
                raise ApiError(
                    "Embedding dimension must be a multiple of 8 for binary embedding "
                    f"types, but got {dims}."
                )
            embeddings[kind] = [_pack(v, kind == "binary") for v in vectors]
        else:
            raise ApiError(f"Unknown embedding type {kind!r}", param="embedding_types")
    tokens = sum(count_input(t) for t in texts)
    rid = "embd-" + (ex.request_id() or uuid.uuid4().hex)
    body = {
        "id": rid,
        "embeddings": embeddings,
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "tokens": {"input_tokens": tokens}},
    }
    await answer(ex, _plan(ex, model, lora, tokens, rid), dumps(body))


def _pack(vec: list[float], signed: bool) -> list[int]:
    out = []
    for start in range(0, len(vec), 8):
        byte = sum((1 if x >= 0 else 0) << (7 - i) for i, x in enumerate(vec[start : start + 8]))
        out.append(byte - 128 if signed else byte)
    return out


def relevance(query: str, document: str) -> float:
    a = set(query.lower().split())
    b = set(document.lower().split())
    return round(len(a & b) / len(a | b), 6) if a | b else 0.0


def _text(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    raise ApiError(f"{param} must be a string or a list of strings", param=param)


async def score(ex: Exchange) -> None:
    data = ex.json()
    model, lora = ex.model(data)
    left = data.get("text_1", data.get("queries"))
    right = data.get("text_2", data.get("documents", data.get("items")))
    if left is None or right is None:
        raise ApiError("Field required: text_1 and text_2", param="text_1")
    lefts = left if isinstance(left, list) else [left]
    rights = right if isinstance(right, list) else [right]
    if len(lefts) == 1:
        lefts = lefts * len(rights)
    if len(lefts) != len(rights) or not rights:
        raise ApiError("text_1 and text_2 must have the same length, or text_1 one item.")
    pairs = [(_text(a, "text_1"), _text(b, "text_2")) for a, b in zip(lefts, rights, strict=True)]
    items = [
        {"index": i, "object": "score", "score": relevance(a, b)} for i, (a, b) in enumerate(pairs)
    ]
    tokens = sum(count_input(a) + count_input(b) for a, b in pairs)
    await _list_answer(ex, "score-", model, lora, items, tokens)


async def rerank(ex: Exchange) -> None:
    data = ex.json()
    model, lora = ex.model(data)
    query = data.get("query")
    documents = data.get("documents")
    if not isinstance(query, str):
        raise ApiError("Field required: query", param="query")
    if not isinstance(documents, list) or not documents:
        raise ApiError("Field required: documents", param="documents")
    texts = [d if isinstance(d, str) else str((d or {}).get("text", "")) for d in documents]
    top_n = data.get("top_n") or 0
    if type(top_n) is not int or top_n < 0:
        raise ApiError("top_n must be a non-negative integer", param="top_n")
    results = sorted(
        (
            {"index": i, "document": {"text": t, "multi_modal": None}, "relevance_score": s}
            for i, t in enumerate(texts)
            for s in [relevance(query, t)]
        ),
        key=lambda r: -float(r["relevance_score"]),  # type: ignore[arg-type]
    )
    if top_n:
        results = results[:top_n]
    tokens = sum(count_input(query) + count_input(t) for t in texts)
    rid = "rerank-" + (ex.request_id() or uuid.uuid4().hex)
    body = {"id": rid, "model": model, "usage": {"total_tokens": tokens}, "results": results}
    await answer(ex, _plan(ex, model, lora, tokens, rid), dumps(body))


async def _list_answer(
    ex: Exchange, prefix: str, model: str, lora: str | None, items: list[Any], tokens: int
) -> None:
    """An embeddings or score answer: vLLM's `object: list` body with prompt-only usage."""
    rid = prefix + (ex.request_id() or uuid.uuid4().hex)
    body = {
        "id": rid,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": items,
        "usage": _usage(tokens),
    }
    await answer(ex, _plan(ex, model, lora, tokens, rid), dumps(body))
