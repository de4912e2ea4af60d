"""The database goes away mid-traffic: nothing counted is lost (fail-open), or requests
are refused while it is gone (fail-closed)."""

from __future__ import annotations

import signal

import httpx
from pg import PgSchema
from servers import KEY_A, wait_until

BODY = {"messages": [{"role": "user", "content": "count me"}], "max_tokens": 9}
AUTH = {"authorization": f"Bearer {KEY_A}"}


def _send(url: str, n: int, stream: bool = False) -> list[int]:
    codes = []
    for _ in range(n):
        r = httpx.post(url + "/v1/chat/completions", json={**BODY, "stream": stream}, headers=AUTH)
        codes.append(r.status_code)
    return codes


def _tokens(url: str, key: str) -> int:
    return PgSchema(url, "public").tokens_today(key)


def _store_events(gw) -> list[bool]:
    return [e["ok"] for e in gw.lines() if e.get("event") == "quota_store"]


def test_postgres_outage_loses_no_usage(temp_pg, make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, DATABASE_URL=temp_pg.url, QUOTA_FLUSH_INTERVAL_SECONDS="0.2")
    assert _send(gw.url, 10) == [200] * 10
    wait_until(lambda: _tokens(temp_pg.url, "team-a") > 0, timeout=3)

    temp_pg.stop()
    # Fail-open: traffic goes on, usage is buffered.
    assert _send(gw.url, 10) + _send(gw.url, 10, stream=True) == [200] * 20
    wait_until(lambda: _store_events(gw) == [False], timeout=3)

    temp_pg.start()
    wait_until(lambda: _store_events(gw) == [False, True], timeout=10)
    assert _send(gw.url, 5) == [200] * 5
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(20) == 0

    stats = sim.stats()
    assert stats["completed"] == 35
    assert _tokens(temp_pg.url, "team-a") == stats["prompt_tokens"] + stats["completion_tokens"]


def test_usage_counted_during_an_outage_is_flushed_at_sigterm_when_the_db_is_back(
    temp_pg, make_sim, make_gateway
) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, DATABASE_URL=temp_pg.url, QUOTA_FLUSH_INTERVAL_SECONDS="5")
    temp_pg.stop()
    assert _send(gw.url, 4) == [200] * 4
    temp_pg.start()
    # The next timed flush is seconds away: SIGTERM must flush what is buffered.
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(20) == 0
    stats = sim.stats()
    assert _tokens(temp_pg.url, "team-a") == stats["prompt_tokens"] + stats["completion_tokens"]


def test_fail_closed_refuses_while_the_store_is_down(temp_pg, make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(
        sim.url,
        DATABASE_URL=temp_pg.url,
        QUOTA_FLUSH_INTERVAL_SECONDS="0.2",
        QUOTA_FAIL_CLOSED="true",
    )
    assert _send(gw.url, 2) == [200, 200]
    temp_pg.stop()
    wait_until(lambda: _store_events(gw) == [False], timeout=3)
    r = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers=AUTH)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "quota_store_unavailable"
    assert "retry-after" in r.headers
    temp_pg.start()
    wait_until(lambda: _send(gw.url, 1) == [200], timeout=10)
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(20) == 0
    stats = sim.stats()
    assert stats["completed"] == 3
    assert _tokens(temp_pg.url, "team-a") == stats["prompt_tokens"] + stats["completion_tokens"]


def test_the_gateway_starts_and_serves_while_the_database_is_down(
    temp_pg, make_sim, make_gateway
) -> None:
    sim = make_sim()
    temp_pg.stop()
    gw = make_gateway(sim.url, DATABASE_URL=temp_pg.url, QUOTA_FLUSH_INTERVAL_SECONDS="0.2")
    assert httpx.get(gw.url + "/ready").status_code == 200
    assert _send(gw.url, 5) == [200] * 5
    assert _store_events(gw) == [False]
    temp_pg.start()  # the schema is created when the database first answers
    wait_until(lambda: _store_events(gw) == [False, True], timeout=10)
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(20) == 0
    stats = sim.stats()
    assert _tokens(temp_pg.url, "team-a") == stats["prompt_tokens"] + stats["completion_tokens"]
