"""Replicas from the configuration document (`upstreams`, the operator's view of an
InferencePool's ready pods): they replace VLLM_URL at start and on every reload, without
a restart."""

from __future__ import annotations

import httpx
from configfile import MountedSecret, document
from servers import KEY_A, scaled


def _codes_by_sim(gw_url: str, sims: list, n: int) -> tuple[list[int], list[int]]:
    before = [s.stats()["requests"] for s in sims]
    codes = [
        httpx.post(
            gw_url + "/v1/completions",
            json={"prompt": "hi", "max_tokens": 2},
            headers={"authorization": f"Bearer {KEY_A}"},
            timeout=scaled(10),
        ).status_code
        for _ in range(n)
    ]
    return codes, [s.stats()["requests"] - b for s, b in zip(sims, before, strict=True)]


def test_the_documents_upstreams_replace_the_settings_and_follow_reloads(
    make_sim, make_gateway, tmp_path
) -> None:
    sims = [make_sim() for _ in range(3)]
    secret = MountedSecret(tmp_path / "config")
    doc = document({KEY_A: {"name": "team-a"}})
    secret.write({**doc, "upstreams": [sims[1].url, sims[2].url]})
    gw = make_gateway(sims[0].url, GATEWAY_CONFIG_FILE=str(secret.path))
    gw.wait_for(
        lambda: httpx.get(gw.url + "/ready").json()["upstream_problems"] == [],
        "the document's replicas checked",
    )
    codes, sent = _codes_by_sim(gw.url, sims, 20)
    assert codes == [200] * 20
    assert sent[0] == 0 and sent[1] + sent[2] == 20, sent

    secret.write({**doc, "upstreams": [sims[0].url]})  # the pool scaled and moved
    gw.wait_for(
        lambda: _codes_by_sim(gw.url, sims, 1)[1] == [1, 0, 0], "requests on the new replica"
    )
    codes, sent = _codes_by_sim(gw.url, sims, 10)
    assert (codes, sent) == ([200] * 10, [10, 0, 0])

    secret.write({**doc, "upstreams": ["not a url"]})  # rejected: the last good one stays
    gw.wait_for(
        lambda: any(e.get("event") == "config_reload" and e.get("ok") is False for e in gw.lines()),
        "the bad document rejected",
    )
    assert _codes_by_sim(gw.url, sims, 3) == ([200] * 3, [3, 0, 0])

    secret.write({**doc, "upstreams": []})  # no ready pod: a clear 503, not a hang
    gw.wait_for(lambda: _codes_by_sim(gw.url, sims, 1)[0] == [503], "no replica left")
    response = httpx.post(
        gw.url + "/v1/completions",
        json={"prompt": "hi"},
        headers={"authorization": f"Bearer {KEY_A}"},
    )
    assert response.json()["error"]["code"] == "no_healthy_upstream"
    assert "no upstream replicas known" in httpx.get(gw.url + "/ready").text
