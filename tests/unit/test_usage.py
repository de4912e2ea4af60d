"""Usage read from a non-stream response body."""

from __future__ import annotations

import json

import pytest

from tollgate_gateway.usage import Usage, estimate_prompt_tokens, parse_usage, usage_from_body

RESPONSE = {
    "id": "r",
    "choices": [{"message": {"content": '"usage": {"prompt_tokens": 99}'}}],
    "usage": {"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2},
}


def tokens(usage: Usage | None) -> tuple[int, int] | None:
    return None if usage is None else (usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(RESPONSE).encode(),  # json.dumps' default spacing
        json.dumps(RESPONSE, separators=(",", ":")).encode(),  # vLLM's
        json.dumps(RESPONSE, indent=2).encode(),
        json.dumps(RESPONSE, indent="\t").encode().replace(b"\n", b"\r\n"),
        b'{"usage" : {"prompt_tokens":4,"completion_tokens":2}, "choices": []}',
        b'{"usage":\n\t{"prompt_tokens":4,"completion_tokens":2}}',
    ],
)
def test_usage_in_any_json_spacing(body: bytes) -> None:
    assert tokens(usage_from_body(body)) == (4, 2)


def test_usage_before_a_string_that_ends_in_usage() -> None:
    """`"usage"` followed by a quote is also how a string ending in `"usage` looks."""
    body = json.dumps({"usage": RESPONSE["usage"], "choices": [{"text": 'say "usage'}]})
    assert tokens(usage_from_body(body.encode())) == (4, 2)


def test_usage_before_a_key_that_ends_in_usage() -> None:
    body = json.dumps(
        {"usage": RESPONSE["usage"], "choices": [{"logprobs": {"top_logprobs": [{'"usage': -1}]}}]}
    )
    assert tokens(usage_from_body(body.encode())) == (4, 2)


@pytest.mark.parametrize(
    "body",
    [
        b'{"usage":null}',
        b'{"usage":{"prompt_tokens":"x"}}',
        b'{"usage":{"prompt_tokens":1,',
        b"not json",
        b"",
    ],
)
def test_no_usage(body: bytes) -> None:
    assert usage_from_body(body) is None


def test_a_bad_byte_elsewhere_does_not_hide_usage() -> None:
    body = b'{"choices":[{"text":"\xff"}],"usage":{"prompt_tokens":4,"completion_tokens":2}}'
    assert tokens(usage_from_body(body)) == (4, 2)


@pytest.mark.parametrize(
    "obj,counts",
    [
        ({"prompt_tokens": 7, "total_tokens": 7, "completion_tokens": 0}, (7, 0)),  # embeddings
        ({"prompt_tokens": 7}, (7, 0)),
        ({"input_tokens": 5, "output_tokens": 9, "total_tokens": 14}, (5, 9)),  # Responses
        ({"input_tokens": 5, "output_tokens": 0}, (5, 0)),  # Anthropic message_start
        ({"output_tokens": 9}, (0, 9)),  # Anthropic's message_delta, without input
        ({"total_tokens": 11}, (11, 0)),  # rerank
        ({"type": "duration", "seconds": 3}, (150, 0)),  # a transcription's audio
    ],
)
def test_every_routes_usage_shape(obj: dict, counts: tuple[int, int]) -> None:
    usage = parse_usage(obj)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == counts


def test_parse_usage_wants_counts() -> None:
    usage = parse_usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 99})
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (1, 2)
    assert usage.tokens == 3 and usage.requests == 1  # one request's usage
    for bad in (
        {"prompt_tokens": 1, "completion_tokens": 2.0},
        {"type": "duration", "seconds": "3"},
        {"prompt_tokens": True, "completion_tokens": 2},
        {"prompt_tokens": -1, "completion_tokens": 2},
        [1, 2],
        None,
    ):
        assert parse_usage(bad) is None, bad


def test_prompt_estimate_is_never_zero() -> None:
    assert estimate_prompt_tokens(b"") == 1
    assert estimate_prompt_tokens(b"x" * 400) == 100
