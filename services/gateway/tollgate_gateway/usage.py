"""Token usage: read from the upstream's answers, and handed to one place.

vLLM reports `usage` in a non-stream response and, for a stream that asked for it
(`stream_options.include_usage`, which the gateway turns on), in a last chunk with
`choices: []`. A stream that breaks before that chunk has no usage: its completion tokens
are estimated by the content chunks it streamed (vLLM sends one per token), and its prompt
tokens from the request's size, so usage is never lost, only marked inexact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_decoder = json.JSONDecoder()
# Bytes per prompt token assumed when the upstream never said (a broken stream).
BYTES_PER_TOKEN_ESTIMATE = 4


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # True when the numbers are the upstream's own; False when estimated.
    exact: bool = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def parse_usage(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    prompt, completion = obj.get("prompt_tokens"), obj.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def usage_from_body(body: bytes) -> Usage | None:
    """The top-level `usage` of a response, read without parsing the whole body.

    `"usage":` with bare quotes cannot occur inside a JSON string (its quotes would be
    escaped), and vLLM puts the top-level usage after the choices, so the last one found
    is the response's.
    """
    at = body.rfind(b'"usage":')
    if at < 0:
        return None
    try:
        obj, _ = _decoder.raw_decode(body[at + 8 :].decode().lstrip())
    except (ValueError, UnicodeDecodeError):
        return None
    return parse_usage(obj)


def estimate_prompt_tokens(body: bytes) -> int:
    return max(1, len(body) // BYTES_PER_TOKEN_ESTIMATE)
