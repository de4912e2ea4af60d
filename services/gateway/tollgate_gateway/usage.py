"""Token usage: read from the upstream's answers, and handed to one place.

One reader for every route's shape: OpenAI's `prompt_tokens` / `completion_tokens`
(chat, completions, embeddings, score), Responses' and Anthropic's `input_tokens` /
`output_tokens`, rerank's `total_tokens` alone, and a transcription's audio duration
(`{"type": "duration", "seconds": S}`, metered as `AUDIO_TOKENS_PER_SECOND` prompt
tokens a second: Whisper's encoder rate).

vLLM reports `usage` in a non-stream response and, for a stream that asked for it
(`stream_options.include_usage`, which the gateway turns on), in a last chunk with
`choices: []`. A stream that breaks before that chunk has no usage: its completion tokens
are estimated by the content chunks it streamed (vLLM sends one per token), and its prompt
tokens from the request's size, so usage is never lost, only marked inexact (by the
request's record). The type is the contract's `Usage`, the one the quota ledger, its
stores and the record already count in; a request's usage is one request.
"""

from __future__ import annotations

import json
import re
from typing import TypeGuard

from tollgate_contract.usage import Usage

_decoder = json.JSONDecoder()
# The `usage` key with an object for its value, in any JSON spacing (vLLM writes
# `"usage":{`, json.dumps and LiteLLM `"usage": {`). Inside a JSON string its quotes are
# escaped, so it matches only a key: `usage` itself, or (rarely) a key ending in `\"usage`,
# which the caller rules out by reading the object it finds.
USAGE_KEY = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')
# Bytes per prompt token assumed when the upstream never said (a broken stream).
BYTES_PER_TOKEN_ESTIMATE = 4
# Audio reported as seconds, in tokens: Whisper's encoder sees 1,500 frames per 30 s.
AUDIO_TOKENS_PER_SECOND = 50


__all__ = ["USAGE_KEY", "Usage", "estimate_prompt_tokens", "parse_usage", "usage_from_body"]


def parse_usage(obj: object) -> Usage | None:
    """The token counts of a `usage` object in any of the shapes above (counts: not
    negative, not booleans, which JSON's `true` would pass as an int)."""
    if not isinstance(obj, dict):
        return None
    for input_key, output_key in (
        ("prompt_tokens", "completion_tokens"),
        ("input_tokens", "output_tokens"),
    ):
        prompt, completion = obj.get(input_key), obj.get(output_key, 0)
        if _count(prompt) and _count(completion):
            return Usage(prompt, completion, 1)
        if input_key not in obj and _count(completion) and output_key in obj:
            return Usage(0, completion, 1)  # Anthropic's message_delta may carry only this
    total = obj.get("total_tokens")
    if _count(total):
        return Usage(total, 0, 1)
    seconds = obj.get("seconds")
    if obj.get("type") == "duration" and isinstance(seconds, int | float) and seconds >= 0:
        return Usage(round(seconds * AUDIO_TOKENS_PER_SECOND), 0, 1)
    return None


def _count(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0


# Per usage key name: the quoted name, and the key with its object's opening brace.
_KEYS = {"usage": (b'"usage"', USAGE_KEY)}


def _key(name: str) -> tuple[bytes, re.Pattern[bytes]]:
    found = _KEYS.get(name)
    if found is None:
        quoted = b'"' + name.encode() + b'"'
        found = _KEYS[name] = (quoted, re.compile(re.escape(quoted) + rb"[ \t\r\n]*:[ \t\r\n]*\{"))
    return found


def usage_from_body(body: bytes, key: str = "usage") -> Usage | None:
    """The top-level `usage` of a response, read without parsing the whole body.

    vLLM puts the top-level usage after the choices, so the last `usage` key is tried
    first, found with one backward search in C (a regular expression over a long
    completion cost more than the rest of reading it); earlier ones are tried only if
    that is not a usage object (a logprobs key ending in `"usage`, say). Only the usage
    object itself is decoded.
    """
    quoted, pattern = _key(key)
    at = body.rfind(quoted)
    last = pattern.match(body, at) if at >= 0 else None
    usage = _usage_at(body, last) if last is not None else None
    if usage is not None:
        return usage
    for found in reversed(list(pattern.finditer(body))):
        usage = _usage_at(body, found)
        if usage is not None:
            return usage
    return None


def _usage_at(body: bytes, found: re.Match[bytes]) -> Usage | None:
    """The usage object whose key `found` matched, if it is one."""
    try:
        # errors="replace": usage is ASCII; a bad byte elsewhere must not hide it.
        obj, _ = _decoder.raw_decode(body[found.end() - 1 :].decode(errors="replace"))
    except ValueError:
        return None
    return parse_usage(obj)


def estimate_prompt_tokens(body: bytes) -> int:
    return max(1, len(body) // BYTES_PER_TOKEN_ESTIMATE)
