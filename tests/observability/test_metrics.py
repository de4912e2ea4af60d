"""/metrics after real traffic: the values match what happened."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from servers import KEY_A, KEY_B

CHAT = "/v1/chat/completions"


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_metrics_follow_real_traffic(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, GATEWAY_MAX_BODY_BYTES="4000", BREAKER_FAILURE_THRESHOLD="1")
    a = {"authorization": f"Bearer {KEY_A}"}
    b = {"authorization": f"Bearer {KEY_B}"}
    msg = [{"role": "user", "content": "four words of prompt"}]
    for _ in range(3):
        r = httpx.post(gw.url + CHAT, json={"messages": msg, "max_tokens": 5}, headers=a)
        assert r.status_code == 200
    for _ in range(2):
        body = {"messages": msg, "max_tokens": 7, "stream": True}
        with httpx.stream("POST", gw.url + CHAT, json=body, headers=b) as r:
            r.read()
    assert httpx.post(gw.url + CHAT, json={"messages": msg}, headers={}).status_code == 401
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert httpx.post(gw.url + CHAT, json=big, headers=a).status_code == 413
    failing = {**a, "x-sim-fault": "error"}
    assert httpx.post(gw.url + CHAT, json={"messages": msg}, headers=failing).status_code == 500
    r = httpx.post(gw.url + CHAT, json={"messages": msg}, headers=a)
    assert r.status_code == 503  # the breaker (threshold 1) opened

    m = _scrape(gw.url)
    route = {"route": CHAT}
    assert _value(m, "tollgate_requests_total", key="team-a", status="200", **route) == 3
    assert _value(m, "tollgate_requests_total", key="team-b", status="200", **route) == 2
    assert _value(m, "tollgate_requests_total", key="none", status="401") == 1
    assert _value(m, "tollgate_requests_total", status="503") == 1
    assert _value(m, "tollgate_requests_total", model="sim-llama", status="200") == 0
    assert _value(m, "tollgate_requests_total", model="default", status="200") == 5
    # Tokens equal what the upstream reported, split by key and type.
    stats = sim.stats()
    assert _value(m, "tollgate_tokens_total", type="input") == stats["prompt_tokens"]
    assert _value(m, "tollgate_tokens_total", type="output") == stats["completion_tokens"]
    assert _value(m, "tollgate_tokens_total", key="team-a", type="output") == 3 * 5
    assert _value(m, "tollgate_tokens_total", key="team-b", type="output") == 2 * 7
    # Histograms: one observation per proxied request, TTFT and TPOT for streams only.
    assert _value(m, "tollgate_request_duration_seconds_count") == 6
    assert _value(m, "tollgate_request_duration_seconds_count", stream="true") == 2
    assert _value(m, "tollgate_time_to_first_token_seconds_count") == 2
    assert _value(m, "tollgate_time_per_output_token_seconds_count") == 2
    assert _value(m, "tollgate_gateway_overhead_seconds_count") == 6
    assert _value(m, "tollgate_upstream_latency_seconds_count") == 6
    # Rejections by reason, upstream errors by kind, the breaker's state and transitions.
    assert _value(m, "tollgate_rejections_total", reason="auth") == 1
    assert _value(m, "tollgate_rejections_total", reason="size") == 1
    assert _value(m, "tollgate_rejections_total", reason="breaker") == 1
    assert _value(m, "tollgate_upstream_errors_total", kind="status_5xx") == 1
    assert _value(m, "tollgate_circuit_breaker_state", state="open") == 1
    assert (
        _value(
            m, "tollgate_circuit_breaker_transitions_total", from_state="closed", to_state="open"
        )
        == 1
    )
    assert _value(m, "tollgate_requests_in_flight") == 0
    assert _value(m, "tollgate_upstream_up") == 1
    assert _value(m, "tollgate_quota_store_up") == 1
    assert _value(m, "tollgate_build_info") == 1


def test_unknown_models_are_folded(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url)
    a = {"authorization": f"Bearer {KEY_A}"}
    for model in ("sim-llama", "made-up-1", "made-up-2"):
        httpx.post(gw.url + "/v1/completions", json={"model": model, "prompt": "x"}, headers=a)
    m = _scrape(gw.url)
    assert _value(m, "tollgate_requests_total", model="sim-llama", status="200") == 1
    # The upstream's own 404s for unknown models land on one label value.
    assert _value(m, "tollgate_requests_total", model="other", status="404") == 2
    assert not any("made-up" in str(labels) for (_, labels) in m)
