"""POST /tokenize and /detokenize in vLLM's shapes (`vllm/entrypoints/serve/tokenize/` in
current vLLM, earlier `openai/serving_tokenization.py`): TokenizeResponse {count,
max_model_len, tokens, token_strs}, DetokenizeResponse {prompt}. The vocabulary is the
simulator's: a token is a word (see tokens.py)."""

from __future__ import annotations

from tollgate_sim.errors import ApiError
from tollgate_sim.exchange import Exchange
from tollgate_sim.http import dumps
from tollgate_sim.tokens import detokenize as words_of
from tollgate_sim.tokens import message_text, remember


async def tokenize(ex: Exchange) -> None:
    data = ex.json()
    ex.model(data)
    if isinstance(data.get("messages"), list):
        text = message_text(data["messages"])
    elif isinstance(data.get("prompt"), str):
        text = data["prompt"]
    else:
        raise ApiError("Field required: prompt or messages", param="prompt")
    ids = remember(text)
    strs = text.split() if data.get("return_token_strs") else None
    body = {
        "count": len(ids),
        "max_model_len": ex.knobs.max_model_len,
        "tokens": ids,
        "token_strs": strs,
    }
    ex.send(200, dumps(body))


async def detokenize(ex: Exchange) -> None:
    data = ex.json()
    ex.model(data)
    ids = data.get("tokens")
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        raise ApiError("Field required: tokens", param="tokens")
    ex.send(200, dumps({"prompt": words_of(ids)}))
