"""The SSE tap: what reaches the client, the usage it reads, the chunks it counts."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from tollgate_gateway import sse
from tollgate_gateway.events import EventTap
from tollgate_gateway.sse import StreamTap

CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
USAGE = (
    b'data: {"id":"c","choices":[],'
    b'"usage":{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3}}\n\n'
)
DONE = b"data: [DONE]\n\n"
STREAM = CHUNK * 3 + USAGE + DONE


def event(obj: object) -> bytes:
    """An event as a json.dumps-spaced server writes it."""
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# The same usage chunk as other OpenAI-compatible servers space it.
SPACED_USAGE = [
    # json.dumps' default separators: LiteLLM Proxy, most Python servers
    event({"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
    b'data: {"id": "c", "choices": [], "usage" : {"prompt_tokens": 7, "completion_tokens": 3}}\n\n',
    b'data:{"id":"c","choices":[],"usage":\t{"prompt_tokens":7,"completion_tokens":3}}\n\n',
    b'data: {"usage":{"prompt_tokens":7,"completion_tokens":3},"choices":[],"id":"c"}\n\n',
]


def run(tap: StreamTap, parts: Iterable[bytes]) -> bytes:
    return b"".join(tap.feed(p) for p in parts) + tap.flush()


def assert_read(tap: StreamTap, chunks: int = 3) -> None:
    assert tap.usage is not None
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (7, 3)
    assert tap.chunks == chunks and tap.done


@pytest.mark.parametrize("strip", [True, False])
def test_any_split_gives_the_same_output(strip: bool) -> None:
    expected = CHUNK * 3 + (b"" if strip else USAGE) + DONE
    for cut in range(1, len(STREAM)):
        for size in (cut, 7):
            tap = StreamTap(strip_usage=strip)
            parts = [STREAM[:cut]] + [STREAM[i : i + size] for i in range(cut, len(STREAM), size)]
            assert run(tap, parts) == expected
            assert_read(tap)


@pytest.mark.parametrize("strip", [True, False])
def test_every_pair_of_cuts_around_the_usage_chunk(strip: bool) -> None:
    """Three reads, cut anywhere in the last content chunk, the usage chunk or [DONE]."""
    stream = CHUNK + USAGE + DONE
    expected = CHUNK + (b"" if strip else USAGE) + DONE
    for first in range(1, len(stream) - 1):
        for second in range(first + 1, len(stream)):
            tap = StreamTap(strip_usage=strip)
            parts = [stream[:first], stream[first:second], stream[second:]]
            assert run(tap, parts) == expected, (first, second)
            assert_read(tap, chunks=1)


def test_one_byte_reads() -> None:
    tap = StreamTap(strip_usage=True)
    assert run(tap, [STREAM[i : i + 1] for i in range(len(STREAM))]) == CHUNK * 3 + DONE
    assert_read(tap)


def test_holds_only_partial_events() -> None:
    tap = StreamTap(strip_usage=True)
    assert tap.feed(CHUNK + CHUNK[:10]) == CHUNK
    assert tap.feed(CHUNK[10:]) == CHUNK
    assert tap.flush() == b""
    assert tap.chunks == 2 and not tap.done


@pytest.mark.parametrize("usage", SPACED_USAGE)
@pytest.mark.parametrize("strip", [True, False])
def test_usage_chunk_found_in_any_json_spacing(usage: bytes, strip: bool) -> None:
    """A usage chunk the tap does not see reaches a client that did not ask for it (the
    OpenAI SDK then fails on `chunk.choices[0]`), and its tokens are only estimated."""
    content = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]})
    tap = StreamTap(strip_usage=strip)
    out = run(tap, [content * 3 + usage + DONE])
    assert out == content * 3 + (b"" if strip else usage) + DONE
    assert_read(tap)


def test_usage_chunk_alone_in_its_read() -> None:
    tap = StreamTap(strip_usage=True)
    assert tap.feed(CHUNK * 3) == CHUNK * 3
    assert tap.feed(SPACED_USAGE[0]) == b""
    assert tap.feed(DONE) == DONE
    assert_read(tap)


def test_usage_chunk_not_last_in_its_read() -> None:
    """Comments (keep-alives) or other events may follow the usage chunk."""
    ping = b": ping\n\n"
    tap = StreamTap(strip_usage=True)
    assert run(tap, [CHUNK * 3 + USAGE + ping + DONE]) == CHUNK * 3 + ping + DONE
    assert tap.usage is not None and tap.usage.completion_tokens == 3
    # the comment is an event like any other: it counts (as before)
    assert tap.chunks == 4 and tap.done


def test_event_with_other_fields_before_its_data() -> None:
    usage = b"id: 9\nevent: message\n" + USAGE
    tap = StreamTap(strip_usage=True)
    assert run(tap, [CHUNK * 3 + usage + DONE]) == CHUNK * 3 + DONE
    assert_read(tap)


def test_keeps_usage_of_continuous_stats_chunks() -> None:
    """vLLM's `continuous_usage_stats`: usage in every content chunk; those are content,
    never removed, and the last usage seen is the one kept."""

    def with_usage(n: int) -> bytes:
        return event(
            {
                "choices": [{"delta": {"content": "x"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n},
            }
        )

    tap = StreamTap(strip_usage=True)
    first = with_usage(1) + with_usage(2)
    assert tap.feed(first) == first
    assert tap.feed(with_usage(3)) == with_usage(3)
    assert tap.chunks == 3 and tap.usage is not None and tap.usage.completion_tokens == 3


def test_null_usage_in_content_chunks_is_content() -> None:
    """OpenAI sends `"usage": null` in every chunk when usage was asked for."""
    content = event({"choices": [{"delta": {"content": "x"}}], "usage": None})
    tap = StreamTap(strip_usage=True)
    assert run(tap, [content * 3 + USAGE + DONE]) == content * 3 + DONE
    assert_read(tap)


def test_usage_text_in_content_is_not_usage() -> None:
    """Generated text that looks like a usage object is escaped inside a JSON string."""
    text = '"usage": {"prompt_tokens": 99, "completion_tokens": 99}'
    content = event({"choices": [], "x": text}) + event({"choices": [{"delta": {"content": text}}]})
    tap = StreamTap(strip_usage=True)
    assert run(tap, [content + DONE]) == content + DONE
    assert tap.usage is None and tap.chunks == 2


def test_logprob_keyed_by_usage_token_is_not_usage() -> None:
    """Legacy completions key `top_logprobs` by token: a token `"usage` makes the bytes
    `"usage": ` appear as a key, with a number for its value."""
    content = event({"choices": [{"text": "u", "logprobs": {"top_logprobs": [{'"usage': -0.1}]}}]})
    tap = StreamTap(strip_usage=True)
    assert run(tap, [content + USAGE + DONE]) == content + DONE
    assert tap.chunks == 1 and tap.usage is not None and tap.usage.prompt_tokens == 7


def test_broken_usage_chunk_passes_through() -> None:
    broken = b'data: {"choices":[],"usage":{"prompt_tokens":7,\n\n'
    tap = StreamTap(strip_usage=True)
    assert run(tap, [CHUNK + broken]) == CHUNK + broken
    assert tap.usage is None and tap.chunks == 2 and not tap.done


def test_unterminated_last_event_is_flushed() -> None:
    tap = StreamTap(strip_usage=True)
    assert tap.feed(CHUNK + b"data: [DO") == CHUNK
    assert tap.flush() == b"data: [DO"
    assert tap.flush() == b""
    assert not tap.done


@pytest.mark.parametrize(
    "after",
    [
        event({"choices": [{"delta": {"content": "x"}}], "usage": None}),
        event({"choices": [{"delta": {"content": 'say "usage'}}]}),  # a string ending in it
    ],
)
def test_usage_chunk_before_an_event_with_another_usage_text(after: bytes) -> None:
    """The last `"usage"` of the read is not the usage key: the one before it is found."""
    tap = StreamTap(strip_usage=True)
    assert run(tap, [CHUNK * 3 + USAGE + after + DONE]) == CHUNK * 3 + after + DONE
    assert tap.usage is not None and tap.usage.completion_tokens == 3
    assert tap.chunks == 4 and tap.done


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("strip", [True, False])
def test_crlf_line_ends_are_events_too_at_any_split(strip: bool) -> None:
    """The SSE spec allows \\r\\n; the stream's first line end says which it uses (a split
    between \\r and \\n included)."""
    stream = _crlf(STREAM)
    expected = _crlf(CHUNK * 3 + (b"" if strip else USAGE) + DONE)
    for cut in range(1, len(stream)):
        tap = StreamTap(strip_usage=strip)
        parts = [stream[:cut], stream[cut:]]
        assert run(tap, parts) == expected, cut
        assert_read(tap)
    tap = StreamTap(strip_usage=True)
    assert tap.feed(_crlf(CHUNK)) == _crlf(CHUNK)  # whole events pass at once


def test_an_endless_event_is_passed_on_not_held_without_bound() -> None:
    tap = StreamTap(strip_usage=True)
    huge = b"data: " + b"x" * sse.MAX_HELD
    assert tap.feed(huge[:100]) == b""  # partial: held
    assert tap.feed(huge[100:]) == huge  # past the bound: on its way, unread
    assert tap.feed(CHUNK) == CHUNK and tap.flush() == b""


def test_named_events_with_crlf_line_ends_are_read() -> None:
    completed = {"type": "response.completed", "response": {"usage": {
        "input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}}  # fmt: skip
    stream = _crlf(
        b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n' * 2
        + b"event: response.completed\ndata: "
        + json.dumps(completed).encode()
        + b"\n\n"
    )
    tap = EventTap(b"event: response.output_text.delta")
    assert b"".join(tap.feed(stream[i : i + 9]) for i in range(0, len(stream), 9)) == stream
    assert tap.chunks == 2
    assert tap.usage is not None and (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (
        5,
        2,
    )
