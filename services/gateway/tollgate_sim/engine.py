"""A cheap model of what a vLLM-aware router reads from a replica: batch capacity with a
waiting queue, a prefix cache, LoRA adapters in use, and the counters behind /metrics.

Nothing here runs unless a knob asks for it: with max_num_seqs 0 and the prefix cache off,
admission is two additions, so the no-delay fast path stays cheap.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from tollgate_sim.knobs import Knobs


@dataclass
class Slot:
    """One admitted request: `seqs` sequences (n choices), its KV share, its adapter."""

    seqs: int
    kv_tokens: int
    lora: str | None
    cached_tokens: int = 0


@dataclass
class _Waiter:
    slot: Slot
    ready: asyncio.Future[None]


@dataclass
class Engine:
    running: int = 0
    waiting: int = 0
    kv_used: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    # When (loop time) the prefills started so far are computed: one at a time, in order.
    prefill_until: float = 0.0
    success: Counter[str] = field(default_factory=Counter)
    lora_running: Counter[str] = field(default_factory=Counter)
    lora_waiting: Counter[str] = field(default_factory=Counter)
    _queue: deque[_Waiter] = field(default_factory=deque)
    _blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def _fits(self, knobs: Knobs, seqs: int) -> bool:
        # An oversized request runs alone rather than never (vLLM would reject it).
        cap = knobs.max_num_seqs
        return cap == 0 or self.running == 0 or self.running + seqs <= cap

    async def admit(
        self, knobs: Knobs, seqs: int, kv_tokens: int, lora: str | None, words: list[str] | None
    ) -> Slot:
        """Start a request, first waiting (FIFO) while the batch is full."""
        slot = Slot(seqs, kv_tokens, lora)
        if not self._queue and self._fits(knobs, seqs):
            self._start(slot)
        else:
            waiter = _Waiter(slot, asyncio.get_running_loop().create_future())
            self._queue.append(waiter)
            self.waiting += seqs
            if lora:
                self.lora_waiting[lora] += 1
            try:
                await waiter.ready
            except asyncio.CancelledError:
                # Abandoned while waiting: it never ran, nothing was processed. One woken
                # (so started) but abandoned before it resumed gives its place back.
                if waiter in self._queue:
                    self._queue.remove(waiter)
                elif waiter.ready.done() and not waiter.ready.cancelled():
                    self.release(knobs, slot)
                raise
            finally:
                self.waiting -= seqs
                if lora:
                    _drop(self.lora_waiting, lora)
        if words is not None and knobs.prefix_cache_blocks:
            slot.cached_tokens = self._prefix(knobs, words, lora)
        return slot

    def prefill(self, seconds: float, now: float) -> float:
        """Seconds from `now` until a prefill of `seconds` of compute is done, after every
        prefill started before it. The GPU runs one engine step at a time, and vLLM's
        scheduler fills each step's token budget with the running requests' prefill chunks
        first, in arrival order: a short prompt behind a long one gets its first token about
        when the long one does. (An abandoned request's compute is not given back.)"""
        start = max(now, self.prefill_until)
        self.prefill_until = start + seconds
        return self.prefill_until - now

    def _start(self, slot: Slot) -> None:
        self.running += slot.seqs
        self.kv_used += slot.kv_tokens
        if slot.lora:
            self.lora_running[slot.lora] += 1

    def release(self, knobs: Knobs, slot: Slot) -> None:
        self.running -= slot.seqs
        self.kv_used -= slot.kv_tokens
        if slot.lora:
            _drop(self.lora_running, slot.lora)
        self._wake(knobs)

    def _wake(self, knobs: Knobs) -> None:
        while self._queue:
            head = self._queue[0]
            if head.ready.done():  # cancelled, its task not yet resumed
                self._queue.popleft()
                continue
            if not self._fits(knobs, head.slot.seqs):
                break
            self._queue.popleft()
            self._start(head.slot)
            head.ready.set_result(None)

    def _prefix(self, knobs: Knobs, words: list[str], lora: str | None) -> int:
        """Look the prompt's full blocks up (a hash chain, so a block matches only after
        the same prefix), count them as vLLM does (in tokens), then insert them (LRU)."""
        size = knobs.block_size
        blocks = self._blocks
        full = len(words) // size
        chain = hash(lora)
        hit_blocks = 0
        matching = True
        for b in range(full):
            chain = hash((chain, *words[b * size : (b + 1) * size]))
            if matching and chain in blocks:
                hit_blocks += 1
                blocks.move_to_end(chain)
            else:
                matching = False
                blocks[chain] = None
        while len(blocks) > knobs.prefix_cache_blocks:
            blocks.popitem(last=False)
        # The last prompt token is always recomputed, as vLLM does for a full hit.
        cached = min(hit_blocks * size, max(0, (len(words) - 1) // size * size))
        self.prefix_queries += len(words)
        self.prefix_hits += cached
        return cached

    def reset_cache(self) -> None:
        self._blocks.clear()


def _drop(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
