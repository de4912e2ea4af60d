"""vLLM-aware replica choice (`GATEWAY_ROUTING=vllm`): each replica scored by its queue,
its KV-cache use and how much of the request's prefix it has cached.

Replicas are not interchangeable: each holds a different KV cache, and one with a deep
queue answers late however few connections it has open. So, as the Gateway API Inference
Extension's endpoint picker does, the gateway reads each replica's own vLLM `/metrics`
on a short interval (`parse_load`: requests running and waiting, KV-cache use, LoRA
adapters loaded) and scores every candidate (`Scorer.rank`), highest first:

    weights.queue   * (1 - its queue, scaled between the candidates' least and most)
  + weights.kv      * (1 - its KV-cache use)
  + weights.prefix  * (the share of the request's leading blocks it served last)
  + weights.prefill * (1 - its prefill work, scaled between the least and most, over at
                       least PREFILL_SCALE bytes)
  + weights.lora    * (1 if the requested LoRA adapter is loaded on it)

The queue is what other clients had running and waiting on the replica at its last
scrape (what it reported, less this gateway's requests then) plus this gateway's
requests in flight to it now, which is exact between scrapes; without a fresh scrape
(older than `stale_after`), the gateway's own in-flight count alone, and a KV use of one
half, so a silent replica is neither favoured nor shunned. The prefix term needs no
tokenizer: the request body's leading bytes, in blocks, are hashed as a chain (a block
matches only after the same prefix, as vLLM's block hashes do), and the `PrefixIndex`
remembers which replica last took each block. Clients append turns at the end of
`messages`, so a conversation's next request shares its body's prefix with the last one.

The prefill term is what a queue count cannot see: a replica computes one prefill after
another, so a short prompt sent behind a long one waits for it. A replica's prefill work
is the request's own bytes it would compute (the body less the prefix it holds) plus the
bytes this gateway sent it that have not had their first answer byte yet (each charged the
same way when sent: `Upstream.prefilling`). Bytes stand in for tokens; PREFILL_SCALE keeps
small differences (uniform short prompts) from outweighing the queue.

The choice is O(replicas + blocks).
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

# Bytes of request body per prefix block (a few dozen tokens), the most blocks hashed
# per request (64 KiB of prefix), and the blocks remembered.
BLOCK_BYTES = 256
MAX_BLOCKS = 256
INDEX_BLOCKS = 65536
# Prefill work differences below this many bytes (a few thousand tokens) count in part.
PREFILL_SCALE = 16384


@dataclass(frozen=True, slots=True)
class Weights:
    queue: float = 2.0
    kv: float = 2.0
    prefix: float = 3.0
    prefill: float = 3.0
    lora: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Weights:
        """`queue=2,kv=2,prefix=3,prefill=3,lora=1` (any subset; the rest keep their
        default)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, raw = part.partition("=")
            name = name.strip()
            if not sep or name not in cls.__dataclass_fields__:
                raise ValueError(
                    f"{part!r}: expected name=weight, names queue, kv, prefix, prefill, lora"
                )
            value = float(raw)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{part!r}: a weight is a number >= 0")
            values[name] = value
        return cls(**values)


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """What a replica's `/metrics` said, and when it was read (time.monotonic)."""

    running: float
    waiting: float
    kv_usage: float  # 0..1
    loras: frozenset[str]
    at: float


_RUNNING = b"vllm:num_requests_running"
_WAITING = b"vllm:num_requests_waiting"
_KV = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")  # new name, old name
_LORA = b"vllm:lora_requests_info"


def parse_load(text: bytes, now: float) -> ReplicaLoad:
    """The scorer's inputs from vLLM's Prometheus text. Only the few lines it needs are
    looked at (vLLM's exposition is mostly histograms). Several engines (data parallel)
    or models: running and waiting add up, the KV use is the fullest's; the LoRA line
    whose value (a timestamp) is the latest says which adapters are loaded."""
    running = waiting = kv = 0.0
    lora_at = -1.0
    loras: frozenset[str] = frozenset()
    for line in text.split(b"\n"):
        if not line.startswith(b"vllm:"):
            continue
        name, _, rest = line.partition(b"{")
        if not rest:
            name, _, rest = line.partition(b" ")
            rest = b"} " + rest
        try:
            value = float(rest.rsplit(b" ", 1)[-1])
        except ValueError:
            continue
        if name == _RUNNING:
            running += value
        elif name == _WAITING:
            waiting += value
        elif name in _KV:
            kv = max(kv, value)
        elif name == _LORA and value > lora_at:
            lora_at = value
            loras = _adapters(rest)
    return ReplicaLoad(running, waiting, min(1.0, max(0.0, kv)), loras, now)


def _adapters(labels: bytes) -> frozenset[str]:
    """`running_lora_adapters="a,b"` (and the waiting ones: they are being loaded)."""
    found: set[str] = set()
    for label in (b'running_lora_adapters="', b'waiting_lora_adapters="'):
        start = labels.find(label)
        if start >= 0:
            start += len(label)
            names = labels[start : labels.find(b'"', start)].decode("utf-8", "replace")
            found.update(n for n in names.split(",") if n)
    return frozenset(found)


def prefix_blocks(body: bytes) -> list[int]:
    """Chained hashes of the body's full leading blocks."""
    view = memoryview(body)
    count = min(len(body) // BLOCK_BYTES, MAX_BLOCKS)
    chain = 0
    hashes = []
    for i in range(count):
        chain = hash((chain, view[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES].tobytes()))
        hashes.append(chain)
    return hashes


def uncached(size: int, depth: int) -> int:
    """The bytes of a `size`-byte body a replica holding its first `depth` blocks would
    compute."""
    return max(0, size - depth * BLOCK_BYTES)


class PrefixIndex:
    """Which replica last took each prefix block: an LRU of `capacity` blocks."""

    def __init__(self, capacity: int = INDEX_BLOCKS) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[int, str] = OrderedDict()

    def depths(self, blocks: Sequence[int]) -> dict[str, int]:
        """Per replica (by base URL), how many leading blocks of the request it took."""
        found: dict[str, int] = {}
        owner = self._owner
        for depth, block in enumerate(blocks, 1):
            base = owner.get(block)
            if base is None:
                break  # a chain: no later block can match either
            found[base] = depth
        return found

    def record(self, blocks: Iterable[int], base: str) -> None:
        owner = self._owner
        for block in blocks:
            owner[block] = base
            owner.move_to_end(block)
        while len(owner) > self.capacity:
            owner.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owner)


class Candidate(Protocol):
    """What the scorer reads of a replica (`upstream.Upstream`)."""

    base: str
    inflight: int
    load: ReplicaLoad | None
    inflight_at_load: int
    prefilling: int


C = TypeVar("C", bound=Candidate)


class Scorer:
    def __init__(
        self,
        weights: Weights,
        stale_after: float,
        index: PrefixIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.weights = weights
        self.stale_after = stale_after
        self.index = index or PrefixIndex()
        self._clock = clock

    def rank(
        self, candidates: Sequence[C], blocks: Sequence[int], lora: str | None, size: int = 0
    ) -> list[C]:
        """The candidates, best first; `size`: the request body's bytes."""
        if len(candidates) < 2:
            return list(candidates)
        now = self._clock()
        w = self.weights
        depths = self.index.depths(blocks) if blocks and (w.prefix or w.prefill) else {}
        queues: list[float] = []
        kvs: list[float] = []
        works: list[int] = []
        for c in candidates:
            load = c.load
            if load is not None and now - load.at <= self.stale_after:
                # Other clients' requests at the scrape, plus this gateway's own now.
                others = max(0.0, load.running + load.waiting - c.inflight_at_load)
                queues.append(others + c.inflight)
                kvs.append(load.kv_usage)
            else:
                queues.append(float(c.inflight))
                kvs.append(0.5)
            works.append(c.prefilling + uncached(size, depths.get(c.base, 0)))
        low, high = min(queues), max(queues)
        spread = high - low
        least = min(works)
        work_spread = max(max(works) - least, PREFILL_SCALE)
        scored = []
        for c, queue, kv, work in zip(candidates, queues, kvs, works, strict=True):
            score = w.queue * (1 - (queue - low) / spread if spread else 1.0)
            score += w.kv * (1 - kv)
            score += w.prefill * (1 - (work - least) / work_spread)
            if depths and w.prefix:
                score += w.prefix * depths.get(c.base, 0) / len(blocks)
            if lora is not None and c.load is not None and lora in c.load.loras:
                score += w.lora
            scored.append((-score, queue, random.random(), c))
        scored.sort(key=lambda entry: entry[:3])
        return [entry[3] for entry in scored]

    def depth(self, base: str, blocks: Sequence[int]) -> int:
        """How many of the request's leading blocks `base` took last."""
        return self.index.depths(blocks).get(base, 0) if blocks else 0

    def chosen(self, candidate: Candidate, blocks: Sequence[int]) -> None:
        """The request went to `candidate`: its prefix is there now."""
        if blocks:
            self.index.record(blocks, candidate.base)
