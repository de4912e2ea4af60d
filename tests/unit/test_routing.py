"""The vLLM-aware scorer's parts: reading vLLM's metrics, prefix blocks, the index, the
ranking."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tollgate_gateway.routing import (
    BLOCK_BYTES,
    PrefixIndex,
    ReplicaLoad,
    Scorer,
    Weights,
    parse_load,
    prefix_blocks,
    uncached,
)

VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 7.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:gpu_cache_usage_perc{engine="1",model_name="llama"} 0.61
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{running_lora_adapters="sql,chat",waiting_lora_adapters="x"} 1.8e9
vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="llama"} 12.0
vllm:num_requests_waiting_bogus not-a-number
"""


def test_vllm_metrics_are_read_summed_over_engines() -> None:
    load = parse_load(VLLM_METRICS, now=5.0)
    assert (load.running, load.waiting, load.kv_usage, load.at) == (5.0, 7.0, 0.61, 5.0)
    assert load.loras == {"sql", "chat", "x"}  # the latest line; waiting ones are loading
    assert parse_load(b"", 0.0) == ReplicaLoad(0.0, 0.0, 0.0, frozenset(), 0.0)
    newer = b'vllm:kv_cache_usage_perc{model_name="m"} 0.9\nvllm:num_requests_waiting 4\n'
    assert (parse_load(newer, 0).kv_usage, parse_load(newer, 0).waiting) == (0.9, 4.0)


def test_weights_parse_and_refuse_nonsense() -> None:
    assert Weights.parse("") == Weights()
    assert Weights.parse("queue=1, prefix=0") == Weights(queue=1.0, prefix=0.0)
    for bad in ("queue", "speed=1", "kv=-1", "kv=nan", "kv=x"):
        with pytest.raises(ValueError):
            Weights.parse(bad)


def test_prefix_blocks_are_a_chain() -> None:
    system = b"s" * (3 * BLOCK_BYTES)
    first = prefix_blocks(system + b"turn one" * 100)
    second = prefix_blocks(system + b"turn two" * 100)
    assert first[:3] == second[:3] and first[3] != second[3]
    # The same block after a different prefix is a different block.
    assert prefix_blocks(b"x" * BLOCK_BYTES + system)[1] != first[0]
    assert prefix_blocks(b"short") == []


def test_the_index_knows_who_took_how_much_and_forgets_the_oldest() -> None:
    index = PrefixIndex(capacity=6)
    a = prefix_blocks(b"a" * 4 * BLOCK_BYTES)
    index.record(a[:2], "http://r1")
    index.record(a, "http://r2")  # r2 took the whole of it later: the blocks are r2's
    assert index.depths(a) == {"http://r2": 4}
    index.record(prefix_blocks(b"b" * 4 * BLOCK_BYTES), "http://r1")
    assert len(index) == 6
    assert index.depths(a) == {}  # a's first blocks were the oldest: the chain is gone


@dataclass
class Replica:
    base: str
    inflight: int = 0
    load: ReplicaLoad | None = None
    inflight_at_load: int = 0
    prefilling: int = 0


def _load(running: float = 0, waiting: float = 0, kv: float = 0, loras=(), at=100.0):
    return ReplicaLoad(running, waiting, kv, frozenset(loras), at)


def _scorer(**weights: float) -> Scorer:
    return Scorer(Weights(**weights), stale_after=1.0, clock=lambda: 100.5)


def test_a_deep_queue_loses_to_a_short_one_whatever_the_connections_say() -> None:
    busy = Replica("http://busy", inflight=0, load=_load(running=8, waiting=30))
    idle = Replica("http://idle", inflight=3, load=_load(running=3))
    assert _scorer().rank([busy, idle], [], None)[0] is idle


def test_requests_sent_since_the_scrape_count_towards_the_queue() -> None:
    a = Replica("http://a", inflight=10, load=_load(running=2), inflight_at_load=2)
    b = Replica("http://b", inflight=2, load=_load(running=4), inflight_at_load=2)
    assert _scorer(kv=0).rank([a, b], [], None)[0] is b  # a: 2 + 8 sent since; b: 4


def test_requests_finished_since_the_scrape_leave_the_queue_at_once() -> None:
    """Between scrapes the gateway's own count is exact; only other clients' share is
    taken from the scrape."""
    drained = Replica("http://drained", inflight=1, load=_load(running=8), inflight_at_load=8)
    shared = Replica("http://shared", inflight=0, load=_load(running=3), inflight_at_load=0)
    assert _scorer(kv=0).rank([drained, shared], [], None)[0] is drained


def test_kv_pressure_counts() -> None:
    full = Replica("http://full", load=_load(running=2, kv=0.95))
    roomy = Replica("http://roomy", load=_load(running=2, kv=0.1))
    assert _scorer().rank([full, roomy], [], None)[0] is roomy


def test_a_cached_prefix_wins_over_a_slightly_shorter_queue() -> None:
    warm = Replica("http://warm", load=_load(running=3))
    cold = Replica("http://cold", load=_load(running=2))
    scorer = _scorer()
    blocks = prefix_blocks(b"p" * 8 * BLOCK_BYTES)
    scorer.chosen(warm, blocks[:6])
    assert scorer.rank([warm, cold], blocks, None)[0] is warm
    # ...but not over a replica with a deep queue.
    warm.load = _load(running=8, waiting=40, kv=0.9)
    assert scorer.rank([warm, cold], blocks, None)[0] is cold


def test_stale_metrics_are_ignored_and_the_gateways_own_count_decides() -> None:
    stale = Replica("http://stale", inflight=5, load=_load(running=0, at=10.0))
    fresh = Replica("http://fresh", inflight=0, load=_load(running=2))
    assert _scorer(kv=0).rank([stale, fresh], [], None)[0] is fresh
    silent = Replica("http://silent", inflight=1)
    assert _scorer(kv=0).rank([stale, silent], [], None)[0] is silent


def test_a_loaded_lora_adapter_is_a_bonus() -> None:
    has = Replica("http://has", load=_load(running=2, loras=["sql"]))
    lacks = Replica("http://lacks", load=_load(running=2))
    assert _scorer().rank([lacks, has], [], "sql")[0] is has
    assert {r.base for r in _scorer().rank([lacks, has], [], "chat")} == {
        "http://has",
        "http://lacks",
    }


def test_a_replica_computing_a_long_prompt_loses_a_short_one() -> None:
    """Equal queues; the one computing 24 KiB of prompt loses although its KV use is lower."""
    computing = Replica("http://computing", inflight=1, load=_load(running=1, kv=0.05))
    generating = Replica("http://generating", inflight=1, load=_load(running=1, kv=0.3))
    computing.prefilling = 24 * 1024
    assert _scorer().rank([computing, generating], [], None, size=200)[0] is generating
    assert _scorer(prefill=0).rank([computing, generating], [], None, size=200)[0] is computing


def test_small_prefill_differences_do_not_outweigh_the_queue() -> None:
    """Uniform short prompts: a few hundred bytes in flight count for little."""
    shorter = Replica("http://shorter", inflight=1, load=_load(running=1), prefilling=400)
    longer = Replica("http://longer", inflight=3, load=_load(running=3), prefilling=0)
    assert _scorer().rank([shorter, longer], [], None, size=200)[0] is shorter


def test_the_prefix_a_replica_holds_is_not_its_work() -> None:
    """A long conversation's next turn: the replica holding all but its last block has a
    block to compute, the others the whole body."""
    warm = Replica("http://warm", load=_load(running=2))
    cold = Replica("http://cold", load=_load(running=2))
    scorer = _scorer(prefix=0)
    body = b"h" * 40 * BLOCK_BYTES
    blocks = prefix_blocks(body)
    scorer.chosen(warm, blocks[:39])
    assert scorer.rank([cold, warm], blocks, None, size=len(body))[0] is warm
    assert uncached(len(body), scorer.depth("http://warm", blocks)) == BLOCK_BYTES
