"""GET /metrics in Prometheus text (format 0.0.4, as prometheus_client writes it) with the
vLLM V1 names a vLLM-aware router reads (`vllm/v1/metrics/loggers.py`,
PrometheusStatLogger): gauges vllm:num_requests_running, vllm:num_requests_waiting,
vllm:kv_cache_usage_perc and the older vllm:gpu_cache_usage_perc, vllm:lora_requests_info
(labels max_lora, waiting_lora_adapters, running_lora_adapters; value the time of the
update), counters vllm:prompt_tokens_total, vllm:generation_tokens_total,
vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total, vllm:num_preemptions_total,
vllm:request_success_total{finished_reason}. Labelled model_name (the first served name)
and engine "0", as vLLM labels them.
"""

from __future__ import annotations

import time

from tollgate_sim.exchange import Exchange

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage."),
)
_COUNTERS = (
    ("vllm:num_preemptions_total", "Cumulative number of preemption from the engine."),
    ("vllm:prompt_tokens_total", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "Number of generation tokens processed."),
    (
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
    ),
    ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens."),
)
_REASONS = ("stop", "length", "abort")


def render(ex: Exchange) -> bytes:
    state = ex.state
    engine = state.engine
    knobs = state.knobs
    labels = f'engine="0",model_name="{knobs.model}"'
    usage = min(1.0, engine.kv_used / knobs.kv_cache_tokens)
    gauges = (engine.running, engine.waiting, usage, usage)
    counters = (
        engine.preemptions,
        engine.prompt_tokens,
        engine.generation_tokens,
        engine.prefix_queries,
        engine.prefix_hits,
    )
    lines: list[str] = []
    for (name, doc), value in zip(_GAUGES, gauges, strict=True):
        lines += [
            f"# HELP {name} {doc}",
            f"# TYPE {name} gauge",
            f"{name}{{{labels}}} {float(value)}",
        ]
    for (name, doc), value in zip(_COUNTERS, counters, strict=True):
        lines += [
            f"# HELP {name} {doc}",
            f"# TYPE {name} counter",
            f"{name}{{{labels}}} {float(value)}",
        ]
    name = "vllm:request_success_total"
    lines += [f"# HELP {name} Count of successfully processed requests.", f"# TYPE {name} counter"]
    for reason in _REASONS:
        lines.append(
            f'{name}{{{labels},finished_reason="{reason}"}} {float(engine.success[reason])}'
        )
    if knobs.lora_names:  # vLLM has this gauge only with LoRA enabled
        name = "vllm:lora_requests_info"
        lines += [f"# HELP {name} Running stats on lora requests.", f"# TYPE {name} gauge"]
        running = ",".join(sorted(engine.lora_running))
        waiting = ",".join(sorted(engine.lora_waiting))
        lines.append(
            f'{name}{{max_lora="{knobs.max_loras}",running_lora_adapters="{running}",'
            f'waiting_lora_adapters="{waiting}"}} {time.time()}'
        )
    return ("\n".join(lines) + "\n").encode()


async def metrics(ex: Exchange) -> None:
    ex.send(200, render(ex), CONTENT_TYPE)
