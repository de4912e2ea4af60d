"""The request path's pure parts: the SSE tap, usage parsing, key hashing, settings."""

from __future__ import annotations

import json
import subprocess

import pytest
from servers import BIN

from tollgate_gateway.keys import KeyRing, env_keys, key_hash
from tollgate_gateway.settings import SettingsError, load_settings
from tollgate_gateway.sse import StreamTap
from tollgate_gateway.usage import usage_from_body

CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
USAGE = (
    b'data: {"id":"c","choices":[],'
    b'"usage":{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3}}\n\n'
)
DONE = b"data: [DONE]\n\n"
STREAM = CHUNK * 3 + USAGE + DONE


@pytest.mark.parametrize("strip", [True, False])
def test_tap_any_split_gives_the_same_output(strip: bool) -> None:
    expected = CHUNK * 3 + (b"" if strip else USAGE) + DONE
    for cut in range(1, len(STREAM)):
        for size in (cut, 7):
            tap = StreamTap(strip_usage=strip)
            parts = [STREAM[:cut]] + [STREAM[i : i + size] for i in range(cut, len(STREAM), size)]
            out = b"".join(tap.feed(p) for p in parts) + tap.flush()
            assert out == expected
            assert tap.usage is not None and (
                tap.usage.prompt_tokens,
                tap.usage.completion_tokens,
            ) == (7, 3)
            assert tap.chunks == 3 and tap.done


def test_tap_holds_only_partial_events() -> None:
    tap = StreamTap(strip_usage=True)
    assert tap.feed(CHUNK + CHUNK[:10]) == CHUNK
    assert tap.feed(CHUNK[10:]) == CHUNK
    assert tap.flush() == b""


def test_tap_keeps_usage_of_continuous_stats_chunks() -> None:
    with_usage = (
        b'data: {"choices":[{"delta":{"content":"x"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    tap = StreamTap(strip_usage=True)
    assert tap.feed(with_usage) == with_usage  # content chunks are never removed
    assert tap.chunks == 1 and tap.usage is not None


def test_usage_from_body() -> None:
    body = json.dumps(
        {
            "choices": [{"message": {"content": '"usage": {"prompt_tokens": 99}'}}],
            "usage": {"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2},
        }
    ).encode()
    usage = usage_from_body(body)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (4, 2)
    assert usage_from_body(b'{"usage":null}') is None
    assert usage_from_body(b'{"usage":{"prompt_tokens":"x"}}') is None
    assert usage_from_body(b"not json") is None


def test_keyring_knows_keys_only_by_hash() -> None:
    ring = KeyRing(env_keys(["alice:sk-1", "sk-2"], None))
    assert ring.authenticate(b"Bearer sk-1").name == "alice"
    assert ring.authenticate(b"bearer sk-2").name == f"key-{key_hash('sk-2')[:12]}"
    assert ring.authenticate(b"Bearer sk-3") is None
    assert ring.authenticate(None) is None
    assert "sk-1" not in repr(vars(ring))


def test_settings_errors_name_the_variable_and_hide_secrets(monkeypatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "70000")
    monkeypatch.setenv("VLLM_URL", "not a url")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "GATEWAY_PORT" in message and "70000" in message
    assert "VLLM_URL" in message


def test_gateway_refuses_to_start_on_bad_settings() -> None:
    result = subprocess.run(
        [str(BIN / "tollgate-gateway")],
        env={
            "GATEWAY_DRAIN_SECONDS": "-1",
            "DATABASE_URL": "postgresql://u:secret@h/db",
            "BREAKER_FAILURE_THRESHOLD": "zero",
            "PATH": "/usr/bin",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "GATEWAY_DRAIN_SECONDS" in result.stderr
    assert "BREAKER_FAILURE_THRESHOLD" in result.stderr
    assert "secret" not in result.stderr
