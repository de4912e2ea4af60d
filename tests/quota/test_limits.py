"""Per-IP and per-key limits on one gateway (SQLite store): each refusal is the right
OpenAI error, with a sane Retry-After, and one key's limits never touch another's."""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from configfile import MountedSecret, document
from servers import KEY_A, KEY_B, wait_until

BODY = {"prompt": "one two", "max_tokens": 3}


def _post(url: str, key: str, body: dict | None = None, **headers: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions",
        json=body or BODY,
        headers={"authorization": f"Bearer {key}", **headers},
    )


def test_ip_rate_limit_and_forwarded_for(make_sim, make_gateway) -> None:
    sim = make_sim()
    plain = make_gateway(sim.url, GATEWAY_IP_RATE_PER_SECOND="0.5", GATEWAY_IP_BURST="2")
    codes = [_post(plain.url, KEY_A).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = _post(plain.url, KEY_B)  # another key, same address: still limited
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 2
    # X-Forwarded-For from an untrusted peer is ignored: still the same (limited) client.
    assert _post(plain.url, KEY_A, **{"x-forwarded-for": "203.0.113.9"}).status_code == 429

    trusting = make_gateway(
        sim.url,
        GATEWAY_IP_RATE_PER_SECOND="0.5",
        GATEWAY_IP_BURST="2",
        GATEWAY_TRUSTED_PROXIES="127.0.0.0/8",
    )
    hop = {"x-forwarded-for": "203.0.113.7, 127.0.0.1"}
    assert [_post(trusting.url, KEY_A, **hop).status_code for _ in range(3)] == [200, 200, 429]
    # Another client behind the same proxy has its own budget.
    other = {"x-forwarded-for": "203.0.113.8"}
    assert _post(trusting.url, KEY_A, **other).status_code == 200


def test_per_key_limits(make_sim, make_gateway, tmp_path) -> None:
    sim = make_sim()
    secret = MountedSecret(tmp_path / "config")
    secret.write(
        document(
            {
                "sk-rpm": {"name": "rpm", "policy": "rpm"},
                "sk-tpm": {"name": "tpm", "policy": "tpm"},
                "sk-day": {"name": "day", "policy": "day"},
                "sk-free": {"name": "free"},
            },
            {
                "rpm": {"requestsPerMinute": 3},
                "tpm": {"tokensPerMinute": 40},
                "day": {"tokensPerDay": 30},
            },
        )
    )
    gw = make_gateway(sim.url, GATEWAY_CONFIG_FILE=str(secret.path))

    assert [_post(gw.url, "sk-rpm").status_code for _ in range(4)] == [200, 200, 200, 429]
    r = _post(gw.url, "sk-rpm")
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "3 requests per minute" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 120

    # Tokens per minute: a reservation of prompt + max_tokens counts while in flight, the
    # real usage after; 5 tokens a request.
    codes = [_post(gw.url, "sk-tpm").status_code for _ in range(10)]
    assert codes[:7] == [200] * 7 and codes[-1] == 429

    # Daily quota: insufficient_quota, the OpenAI SDK's RateLimitError.
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-day", max_retries=0)
    for _ in range(6):
        client.completions.create(model="sim-llama", prompt="one two", max_tokens=3)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="sim-llama", prompt="one two", max_tokens=3)
    assert info.value.code == "insufficient_quota"
    retry = int(info.value.response.headers["retry-after"])
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(retry - (midnight - now).total_seconds()) < 5
    usage = httpx.get(gw.url + "/v1/usage", headers={"authorization": "Bearer sk-day"}).json()
    assert usage["tokens_used"] == 30 and usage["remaining"] == 0

    # None of that touched the other keys.
    assert all(_post(gw.url, "sk-free").status_code == 200 for _ in range(5))


def test_concurrency_models_disabled_expired_and_rotated_keys(
    make_sim, make_gateway, tmp_path
) -> None:
    sim = make_sim()
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat()
    from tollgate_contract.keys import key_hash

    secret = MountedSecret(tmp_path / "config")

    def keys(previous_valid_until: str) -> dict[str, Any]:
        return document(
            {
                "sk-one-at-a-time": {"name": "single", "policy": "single"},
                "sk-llama-only": {"name": "llama-only", "models": ["sim-llama"]},
                "sk-other-only": {"name": "other-only", "models": ["other-model"]},
                "sk-disabled": {"name": "disabled", "disabled": True},
                "sk-expired": {"name": "expired", "expiresAt": past},
                "sk-new": {
                    "name": "rotated",
                    "previousHash": key_hash("sk-old"),
                    "previousValidUntil": previous_valid_until,
                },
            },
            {"single": {"maxConcurrentRequests": 1}},
        )

    secret.write(keys(later))
    gw = make_gateway(sim.url, GATEWAY_CONFIG_FILE=str(secret.path))

    done: list[int] = []
    slow = threading.Thread(
        target=lambda: done.append(
            _post(gw.url, "sk-one-at-a-time", **{"x-sim-ttft-ms": "700"}).status_code
        )
    )
    slow.start()
    time.sleep(0.3)
    r = _post(gw.url, "sk-one-at-a-time")
    assert r.status_code == 429 and "concurrent" in r.json()["error"]["message"]
    slow.join()
    assert done == [200]
    assert _post(gw.url, "sk-one-at-a-time").status_code == 200

    body = {"model": "sim-llama", "prompt": "x", "max_tokens": 1}
    assert _post(gw.url, "sk-llama-only", body).status_code == 200
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-other-only", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.completions.create(model="sim-llama", prompt="x")
    assert info.value.code == "model_not_allowed"

    for key, why in (("sk-disabled", "disabled"), ("sk-expired", "expired")):
        r = _post(gw.url, key)
        assert r.status_code == 401 and why in r.json()["error"]["message"]

    # Rotation: the previous key works until its deadline, then only the new one does.
    # The deadline is set once the gateway is up, so start-up time cannot eat into it.
    assert _post(gw.url, "sk-new").status_code == 200
    assert _post(gw.url, "sk-old").status_code == 200
    secret.write(keys((dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()))
    old_codes: list[int] = []
    gw.wait_for(
        lambda: old_codes.append(_post(gw.url, "sk-old").status_code) or old_codes[-1] == 401,
        "the previous key to stop working after its rotation deadline",
        timeout=10,
    )
    assert set(old_codes[:-1]) <= {200}
    assert _post(gw.url, "sk-new").status_code == 200
    usage = httpx.get(gw.url + "/v1/usage", headers={"authorization": "Bearer sk-new"}).json()
    # One name, one count, whichever of the two keys was used.
    assert usage["key"] == "rotated" and usage["requests"] == 3 + len(old_codes) - 1


def test_disconnect_settles_usage_and_releases_the_reservation(
    make_sim, make_gateway, tmp_path
) -> None:
    sim = make_sim()
    secret = MountedSecret(tmp_path / "config")
    secret.write(
        document({"sk-day": {"name": "day", "policy": "day"}}, {"day": {"tokensPerDay": 200}})
    )
    gw = make_gateway(sim.url, GATEWAY_CONFIG_FILE=str(secret.path))
    auth = {"authorization": "Bearer sk-day"}
    big = {"prompt": "x", "max_tokens": 190, "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/completions", json=big, headers={**auth, "x-sim-itl-ms": "50"}
    ) as r:
        received = b""
        for part in r.iter_raw():
            received += part
            if received.count(b"\n\n") >= 4:
                # While this stream holds its reservation, nothing else fits in the quota.
                refused = _post(gw.url, "sk-day")
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "insufficient_quota"
                break
    # The client left: what was streamed is counted, the rest of the reservation is freed.
    wait_until(lambda: sim.stats()["cancelled"] == 1, timeout=3)
    usage = wait_until(
        lambda: (
            (u := httpx.get(gw.url + "/v1/usage", headers=auth).json())["tokens_used"] > 0 and u
        ),
        timeout=3,
    )
    assert 4 <= usage["completion_tokens"] <= sim.stats()["tokens_sent"]
    assert _post(gw.url, "sk-day").status_code == 200


def test_sqlite_usage_survives_a_restart(make_sim, make_gateway, tmp_path) -> None:
    sim = make_sim()
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/usage.db"}
    first = make_gateway(sim.url, **env)
    for _ in range(3):
        assert _post(first.url, KEY_A).status_code == 200
    first.signal(signal.SIGTERM)
    assert first.wait_exit(15) == 0
    second = make_gateway(sim.url, **env)
    usage = httpx.get(second.url + "/v1/usage", headers={"authorization": f"Bearer {KEY_A}"})
    assert usage.json()["tokens_used"] == 3 * (2 + 3)
    assert usage.json()["requests"] == 3
