"""Issue #17: batch capacity and the waiting queue, the prefix cache, LoRA adapters and
/metrics with vLLM's names."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable

import httpx
from servers import Sim, wait_until


def metric(sim: Sim, name: str, **labels: str) -> float | None:
    text = httpx.get(sim.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _post_later(url: str, body: dict[str, object], out: list[float]) -> threading.Thread:
    def run() -> None:
        began = time.monotonic()
        httpx.post(url, json=body, timeout=60).raise_for_status()
        out.append(time.monotonic() - began)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_requests_beyond_max_num_seqs_wait(start: Callable[..., Sim]) -> None:
    sim = start("--max-num-seqs", "1", "--ttft-ms", "1000")
    url = sim.url + "/v1/completions"
    body = {"prompt": "x", "max_tokens": 1}
    times: list[float] = []
    first = _post_later(url, body, times)
    wait_until(lambda: metric(sim, "vllm:num_requests_running") == 1.0, timeout=10)
    second = _post_later(url, body, times)
    waiting = wait_until(lambda: metric(sim, "vllm:num_requests_waiting") == 1.0, timeout=10)
    assert waiting and sim.stats()["waiting"] == 1
    first.join(30)
    second.join(30)
    # the second waited for the first: its time to answer is about two TTFTs
    assert max(times) >= 1.8
    assert metric(sim, "vllm:num_requests_running") == 0.0
    assert metric(sim, "vllm:num_requests_waiting") == 0.0


def test_a_request_abandoned_while_waiting_is_not_processed(start: Callable[..., Sim]) -> None:
    sim = start("--max-num-seqs", "1", "--ttft-ms", "1500")
    times: list[float] = []
    first = _post_later(sim.url + "/v1/completions", {"prompt": "a b", "max_tokens": 1}, times)
    wait_until(lambda: sim.stats()["running"] == 1, timeout=10)
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(
            sim.url + "/v1/completions", json={"prompt": "c d e", "max_tokens": 1}, timeout=0.5
        )
    first.join(30)
    stats = wait_until(lambda: (s := sim.stats())["cancelled"] == 1 and s, timeout=10)
    assert stats["prompt_tokens_processed"] == 2  # the abandoned one never ran
    assert stats["waiting"] == 0 and stats["running"] == 0


def test_prefix_cache_hit_shortens_ttft(start: Callable[..., Sim]) -> None:
    sim = start("--prefix-cache-blocks", "64", "--block-size", "4", "--ttft-ms", "1500")
    prompt = " ".join(f"w{i}" for i in range(17))  # 4 full blocks and one token
    body = {"model": "sim-llama", "input": prompt, "max_output_tokens": 1}

    def timed() -> tuple[float, dict[str, object]]:
        began = time.monotonic()
        answer = httpx.post(sim.url + "/v1/responses", json=body, timeout=30).json()
        return time.monotonic() - began, answer

    cold, first = timed()
    warm, second = timed()
    assert first["usage"]["input_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]
    assert second["usage"]["input_tokens_details"]["cached_tokens"] == 16  # type: ignore[index]
    assert cold >= 1.4 and warm < cold - 0.8  # 16 of 17 tokens cached: about 1/17 of TTFT
    assert metric(sim, "vllm:prefix_cache_queries_total", model_name="sim-llama") == 34.0
    assert metric(sim, "vllm:prefix_cache_hits_total") == 16.0
    # another prefix misses
    other = {**body, "input": "other " + prompt}
    again = httpx.post(sim.url + "/v1/responses", json=other, timeout=30).json()
    assert again["usage"]["input_tokens_details"]["cached_tokens"] == 0


def test_lora_adapters_are_models_and_metrics(start: Callable[..., Sim]) -> None:
    sim = start("--lora", "sql", "--lora", "chat", "--max-loras", "2", "--ttft-ms", "1500")
    times: list[float] = []
    thread = _post_later(
        sim.url + "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1}, times
    )
    wait_until(
        lambda: metric(sim, "vllm:lora_requests_info", running_lora_adapters="sql"), timeout=10
    )
    assert metric(sim, "vllm:lora_requests_info", max_lora="2", waiting_lora_adapters="")
    thread.join(30)
    assert metric(sim, "vllm:lora_requests_info", running_lora_adapters="")


def test_metrics_names_and_counters(start: Callable[..., Sim]) -> None:
    sim = start("--model", "m1")
    httpx.post(sim.url + "/v1/completions", json={"prompt": "a b c", "max_tokens": 4})
    answer = httpx.get(sim.url + "/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        assert re.search(rf'^{re.escape(name)}{{engine="0",model_name="m1"}} ', text, re.M), name
    assert "vllm:lora_requests_info" not in text  # only with LoRA enabled, as in vLLM
    assert metric(sim, "vllm:prompt_tokens_total") == 3.0
    assert metric(sim, "vllm:generation_tokens_total") == 4.0
    assert metric(sim, "vllm:request_success_total", finished_reason="length") == 1.0
