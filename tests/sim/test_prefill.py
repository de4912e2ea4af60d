"""The prefill cost: time to first token grows with the prompt tokens the prefix cache did
not hold (`prefill_ms_per_1k_tokens`), computed one prefill after another per replica, so a
prefix- and load-aware router's wins show in timings.

Every bound below is a sleep's lower bound or a gap of hundreds of milliseconds, so a slow
machine cannot make a test pass or fail by its speed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
from servers import Sim, scaled
from test_engine import metric


def words(count: int, tag: str) -> str:
    """`count` distinct words (tokens), prefixed by `tag` so prompts do not share blocks."""
    return " ".join(f"{tag}{i}" for i in range(count))


def first_token_s(sim: Sim, prompt: str, headers: dict[str, str] | None = None) -> float:
    """Seconds from sending a streamed chat to its first content byte."""
    body = {
        "model": "sim-llama",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 2,
        "stream": True,
    }
    began = time.monotonic()
    with httpx.stream(
        "POST", sim.url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_bytes():
            if chunk:
                return time.monotonic() - began
    raise AssertionError("the stream had no content")


def test_a_long_uncached_prompt_waits_for_its_prefill(start: Callable[..., Sim]) -> None:
    # 200 ms per 1000 tokens: 3000 tokens cost 600 ms, 20 cost 4 ms
    sim = start("--prefill-ms-per-1k-tokens", "200")
    long = first_token_s(sim, words(3000, "long"))
    short = first_token_s(sim, words(20, "short"))
    assert long >= 0.6
    assert long > short + 0.4


def test_a_repeated_prompt_skips_the_cached_prefill(start: Callable[..., Sim]) -> None:
    sim = start(
        "--prefix-cache-blocks", "1024", "--block-size", "16",
        "--ttft-ms", "100", "--prefill-ms-per-1k-tokens", "400",
    )  # fmt: skip
    prompt = words(2000, "p")  # 124 full blocks and 16 tokens
    cold = first_token_s(sim, prompt)
    warm = first_token_s(sim, prompt)
    # cold: 100 ms + 2000 tokens' prefill (800 ms); warm: 1984 tokens cached, so about
    # 1 ms of ttft_ms and 16 tokens' prefill (6 ms)
    assert cold >= 0.9
    assert warm < cold - 0.6
    assert metric(sim, "vllm:prefix_cache_hits_total") == 1984.0


def test_prefill_is_set_at_run_time_and_per_request(start: Callable[..., Sim]) -> None:
    sim = start()
    prompt = words(2000, "q")
    # per request: 300 ms per 1000 tokens of 2000 is 600 ms
    slow = first_token_s(sim, prompt, {"x-sim-prefill-ms-per-1k-tokens": "300"})
    fast = first_token_s(sim, words(2000, "r"))
    assert slow >= 0.6 and slow > fast + 0.4
    sim.configure(prefill_ms_per_1k_tokens=300)
    assert first_token_s(sim, words(2000, "s")) >= 0.6
    refused = httpx.post(sim.url + "/sim/config", json={"prefill_ms_per_1k_tokens": -1})
    assert refused.status_code == 400 and "delays must be >= 0" in refused.text


def test_a_short_prompt_behind_a_long_one_waits_for_its_prefill(
    start: Callable[..., Sim],
) -> None:
    """One GPU computes one prefill after another: a short prompt admitted while a long
    one is being computed gets its first token after the long one's, not 1.5 s before."""
    sim = start("--prefill-ms-per-1k-tokens", "500")  # 3000 tokens: 1.5 s, 20: 10 ms
    firsts: dict[str, float] = {}

    def send(name: str, prompt: str) -> None:
        began = time.monotonic()
        firsts[name] = began + first_token_s(sim, prompt)

    long = threading.Thread(target=send, args=("long", words(3000, "long")))
    long.start()
    try:
        deadline = time.monotonic() + scaled(30)
        while metric(sim, "vllm:num_requests_running") != 1.0:
            assert time.monotonic() < deadline, "the long prompt was never admitted"
            time.sleep(0.01)
        send("short", words(20, "short"))
    finally:
        long.join(scaled(60))
    # Before the short one's first token comes the long one's (0.1 s for the threads).
    assert firsts["short"] >= firsts["long"] - 0.1, firsts
    # A prompt alone again is fast: the wait was for the other prefill.
    assert first_token_s(sim, words(20, "again")) < 1.0
