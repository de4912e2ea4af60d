"""The simulator's tokenizer, deterministic so tests can predict usage.

A prompt's token is a whitespace-separated word; a text of no words still costs 1 (as a
BOS token would). A list of integers is token ids and costs its length. Output token `i`
of every choice is WORDS[i % 8], so a text of k tokens is predictable too. Token ids are
a word's stable CRC32 modulo 50,000, so /tokenize and /detokenize agree with each other.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

WORDS = ("Hello", " from", " the", " tollgate", " simulator", ".", " It", " streams")
_VOCAB = 50_000


def token(i: int) -> str:
    return WORDS[i % len(WORDS)]


@functools.lru_cache(maxsize=256)
def output_text(tokens: int) -> str:
    return "".join(token(i) for i in range(tokens))


def count(text: str) -> int:
    return max(1, len(text.split()))


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def count_input(value: Any) -> int:
    """A string, or token ids (their number)."""
    if is_token_ids(value):
        return len(value)
    return count(value if isinstance(value, str) else str(value))


def detokenize(token_ids: list[int]) -> str:
    """Ids back to text: a known id is its word, any other `<id>` (the vocabulary is the
    words this process tokenized)."""
    return " ".join(_SEEN.get(t, f"<{t}>") for t in token_ids)


_SEEN: dict[int, str] = {}


def remember(text: str) -> list[int]:
    """Token ids of `text`, remembering the words so /detokenize can give them back."""
    words = text.split()
    out = []
    for word in words:
        tid = zlib.crc32(word.encode()) % _VOCAB
        if len(_SEEN) < 100_000:
            _SEEN[tid] = word
        out.append(tid)
    return out


def message_text(messages: list[Any]) -> str:
    """The text of chat messages: string contents and the `text` of content parts."""
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
    return " ".join(parts)
