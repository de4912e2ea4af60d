"""The request path's pure parts: key hashing, settings (the SSE tap and usage parsing
are in tests/unit)."""

from __future__ import annotations

import subprocess

import pytest
from servers import BIN

from tollgate_contract.keys import key_hash
from tollgate_gateway.errors import Refusal
from tollgate_gateway.keys import KeyRing, env_keys
from tollgate_gateway.settings import SettingsError, load_settings


def _refusal(ring: KeyRing, headers: list[tuple[bytes, bytes]]) -> Refusal:
    with pytest.raises(Refusal) as info:
        ring.authenticate(headers)
    return info.value


def test_keyring_knows_keys_only_by_hash() -> None:
    ring = KeyRing(env_keys(["alice:sk-1", "sk-2"], None))
    assert ring.authenticate([(b"authorization", b"Bearer sk-1")]).name == "alice"
    assert ring.authenticate([(b"authorization", b"bearer sk-2")]).name == (
        f"key-{key_hash('sk-2')[:12]}"
    )
    # Anthropic-style and Azure-style clients send the key in their own headers.
    assert ring.authenticate([(b"x-api-key", b"sk-1")]).name == "alice"
    assert ring.authenticate([(b"api-key", b"sk-1")]).name == "alice"
    assert "Incorrect" in _refusal(ring, [(b"authorization", b"Bearer sk-3")]).message
    assert "Missing" in _refusal(ring, []).message
    assert "sk-1" not in repr(vars(ring))


def test_two_different_keys_are_refused_whichever_headers_carry_them() -> None:
    ring = KeyRing(env_keys(["alice:sk-1", "bob:sk-2"], None))
    for headers in (
        [(b"authorization", b"Bearer sk-1"), (b"authorization", b"Bearer sk-2")],
        [(b"authorization", b"Bearer sk-1"), (b"x-api-key", b"sk-2")],
    ):
        refusal = _refusal(ring, headers)
        assert refusal.kind.status == 400 and "more than one" in refusal.message
    # The same key twice is one key.
    same = [(b"authorization", b"Bearer sk-1"), (b"x-api-key", b"sk-1")]
    assert ring.authenticate(same).name == "alice"


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
