"""GATEWAY_ROUTING=vllm on real simulators: the gateway reads each replica's vLLM
/metrics and keeps requests off a replica whose queue is deep (which its own
connection count cannot see), and sends a conversation back to the replica holding its
prefix."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families
from servers import KEY_A, scaled

AUTH = {"authorization": f"Bearer {KEY_A}"}


def _gauge(url: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return None


def _chat(url: str, messages: list[dict], **headers: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 4},
        headers={**AUTH, **headers},
        timeout=scaled(30),
    )


def test_a_replica_with_a_deep_queue_gets_no_new_requests(make_sim, make_gateway) -> None:
    queued = make_sim("--max-num-seqs", "1")
    free = make_sim("--max-num-seqs", "1")
    gw = make_gateway(
        queued.url,
        VLLM_URLS=f"{queued.url},{free.url}",
        GATEWAY_ROUTING="vllm",
        GATEWAY_ROUTING_SCRAPE_SECONDS="0.1",
    )
    # Another client of that replica (not through this gateway) fills its queue: this
    # gateway has nothing in flight there, which is all least-outstanding would see.
    stop = threading.Event()

    def occupy() -> None:
        while not stop.is_set():
            _chat(queued.url, [{"role": "user", "content": "x"}], **{"x-sim-ttft-ms": "400"})

    with ThreadPoolExecutor(6) as others:
        for _ in range(6):
            others.submit(occupy)
        try:
            name = queued.url.removeprefix("http://")
            gw.wait_for(
                lambda: (_gauge(gw.url, "tollgate_upstream_vllm_requests_waiting", upstream=name)
                         or 0) >= 3,
                "the gateway to read the replica's queue",
            )  # fmt: skip
            before = free.stats()["requests"]
            codes = [_chat(gw.url, [{"role": "user", "content": "hi"}]).status_code
                     for _ in range(12)]  # fmt: skip
            to_free = free.stats()["requests"] - before
        finally:
            stop.set()
    assert codes == [200] * 12
    # P2C, with nothing of its own in flight on either, would split them evenly.
    assert to_free >= 11, to_free


def test_a_conversation_returns_to_the_replica_with_its_prefix(make_sim, make_gateway) -> None:
    sims = [make_sim("--prefix-cache-blocks", "4096") for _ in range(3)]
    gw = make_gateway(sims[0].url, VLLM_URLS=",".join(s.url for s in sims), GATEWAY_ROUTING="vllm")
    system = {"role": "system", "content": "You are a careful assistant. " * 300}
    history = [system]
    for turn in range(8):
        history.append({"role": "user", "content": f"question {turn}"})
        response = _chat(gw.url, history)
        assert response.status_code == 200
        history.append({"role": "assistant", "content": response.json()["choices"][0]
                        ["message"]["content"]})  # fmt: skip
    counts = sorted(s.stats()["requests"] for s in sims)
    # Sequential requests with nothing in flight: P2C spreads them at random over three.
    assert counts == [0, 0, 8], counts
    # Another conversation may go anywhere, and is followed there too.
    other = [{"role": "system", "content": "You translate. " * 400}]
    for turn in range(4):
        other.append({"role": "user", "content": f"sentence {turn}"})
        assert _chat(gw.url, other).status_code == 200
    assert sum(s.stats()["requests"] for s in sims) == 12
    assert sorted(s.stats()["requests"] for s in sims)[-1] >= 8


def _metric(url: str, name: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for sample in family.samples
        if sample.name == name
    )


def _stream(url: str, content: str, max_tokens: int) -> None:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=scaled(60)) as answer:  # fmt: skip
        assert answer.status_code == 200
        for _ in answer.iter_bytes():
            pass


def test_short_prompts_go_around_a_replica_busy_with_a_long_prefill(make_sim, make_gateway) -> None:
    """A replica computes one prefill after another. Both replicas have one request in
    flight (equal queues), one still computing a long prompt, the other generating a long
    answer (so its KV use is the higher): short prompts go to the latter."""
    shape = ("--prefill-ms-per-1k-tokens", "2000", "--itl-ms", "2")  # 3000 tokens: 6 s
    sims = [make_sim(*shape) for _ in range(2)]
    gw = make_gateway(
        sims[0].url,
        VLLM_URLS=",".join(s.url for s in sims),
        GATEWAY_ROUTING="vllm",
        GATEWAY_ROUTING_SCRAPE_SECONDS="0.1",
    )
    long_prompt = " ".join(f"w{i}" for i in range(3000))
    with ThreadPoolExecutor(2) as pool:
        prefilling = pool.submit(_stream, gw.url, long_prompt, 4)
        gw.wait_for(
            lambda: sum(s.stats()["requests"] for s in sims) == 1, "the long prompt to be sent"
        )
        generating = pool.submit(_stream, gw.url, "go on", 4000)  # 8 s of tokens
        gw.wait_for(
            lambda: all(_metric(s.url, "vllm:num_requests_running") == 1 for s in sims),
            "a request running on each replica",
        )
        busy = max(sims, key=lambda s: _metric(s.url, "vllm:prompt_tokens_total"))
        other = next(s for s in sims if s is not busy)
        gw.wait_for(
            lambda: (_gauge(gw.url, "tollgate_upstream_vllm_kv_cache_usage",
                            upstream=other.url.removeprefix("http://")) or 0) > 0,
            "the gateway to read the generating replica's KV use",
        )  # fmt: skip
        before = other.stats()["requests"]
        codes = [_chat(gw.url, [{"role": "user", "content": f"hi {i}"}]).status_code
                 for i in range(5)]  # fmt: skip
        to_other = other.stats()["requests"] - before
        prefilling.result(scaled(60))
        generating.result(scaled(60))
    assert codes == [200] * 5
    # Counting queues and KV use alone, the prefilling replica looks the better one.
    assert to_other == 5, to_other
