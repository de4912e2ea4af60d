"""The one generation driver every generative route runs: faults, admission to the engine,
time to first token, tokens at the inter-token latency, cut and cancelled streams, and the
stats. Routes differ only in their Renderer, which turns tokens into their wire format.

Time to first token is `ttft_ms`, shortened by the prefix cache's share of the prompt, plus
a prefill cost per prompt token the cache did not hold (`prefill_ms_per_1k_tokens`),
computed in turn with the replica's other prefills: in vLLM a long uncached prompt is what
makes a first token late (its own, and those of the prompts that arrive behind it), and a
cache hit is what a prefix-aware router wins, so both must show in the simulator's timings.

With no delays a whole stream leaves in one `write`; with delays each event is its own
chunked-encoding chunk, as uvicorn sends them. The client leaving cancels the task, so a
request abandoned while waiting, before its first token or mid-stream ends at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tollgate_sim import http
from tollgate_sim.engine import Engine
from tollgate_sim.errors import ApiError
from tollgate_sim.exchange import Exchange
from tollgate_sim.knobs import Knobs


@dataclass
class Plan:
    """What to generate: `choices` sequences of `max_tokens` each."""

    model: str
    lora: str | None
    prompt_tokens: int
    max_tokens: int
    stream: bool
    request_id: str
    choices: int = 1
    # Sequences usage counts (more than `choices` only for best_of billed).
    billed: int = 0
    # Prompt words, for the prefix cache (None where the prompt is not text).
    words: list[str] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        self.billed = max(self.billed, self.choices)

    @property
    def completion_tokens(self) -> int:
        return self.billed * self.max_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Renderer:
    """A route's wire format for one Plan. Events are whole SSE events (bytes)."""

    content_type = http.SSE  # of a stream
    body_type = http.JSON  # of a whole answer
    # Whether the stream / the body carries usage (what Stats.prompt_tokens counts).
    usage_in_stream = True
    usage_in_body = True

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def head(self) -> list[bytes]:
        return []

    def token(self, step: int, choice: int) -> bytes:
        raise NotImplementedError

    def tail(self) -> list[bytes]:
        return []

    def body(self) -> bytes:
        raise NotImplementedError

    def events(self) -> Iterator[tuple[bool, bytes]]:
        """(is a token, event) in order: head, tokens step by step (choices interleaved
        as vLLM's engine steps them), tail."""
        for event in self.head():
            yield False, event
        token = self.token
        choices = range(self.plan.choices)
        for step in range(self.plan.max_tokens):
            for choice in choices:
                yield True, token(step, choice)
        for event in self.tail():
            yield False, event


def first_token_ms(knobs: Knobs, prompt_tokens: int, cached_tokens: int) -> tuple[float, float]:
    """Milliseconds from admission to the first token, as (`ttft_ms` less the cached share
    of the prompt: the request's own; the prefill of the `prompt_tokens - cached_tokens`
    computed: in turn with the replica's other prefills, `Engine.prefill`)."""
    ttft = knobs.ttft_ms
    if ttft and cached_tokens:
        ttft *= 1 - cached_tokens / prompt_tokens
    prefill = knobs.prefill_ms_per_1k_tokens * (prompt_tokens - cached_tokens) / 1000
    return ttft, prefill


async def wait_first_token(engine: Engine, knobs: Knobs, prompt_tokens: int, cached: int) -> None:
    own, prefill = first_token_ms(knobs, prompt_tokens, cached)
    delay = own / 1000
    if prefill:
        delay += engine.prefill(prefill / 1000, asyncio.get_running_loop().time())
    if delay:
        await asyncio.sleep(delay)


def pick_fault(ex: Exchange) -> str:
    """Apply the `fault` knob; "none", "cut", or "done" when it already answered."""
    knobs = ex.knobs
    fault = knobs.fault
    if fault == "none" or (knobs.fault_rate < 1.0 and random.random() >= knobs.fault_rate):
        return "none"
    ex.state.stats.faults += 1
    if fault == "error":
        ex.send_error(ApiError("simulated failure", knobs.error_status))
    elif fault == "reset":
        ex.wire.abort()
    elif fault == "stall":
        pass  # never answer; the client gives up and closes
    else:
        return fault
    return "done"


async def generate(ex: Exchange, plan: Plan, render: Renderer) -> None:
    fault = pick_fault(ex)
    if fault == "done":
        return
    state = ex.state
    stats = state.stats
    engine = state.engine
    knobs = ex.knobs
    stats.max_max_tokens = max(stats.max_max_tokens, plan.max_tokens)
    kv = plan.prompt_tokens + plan.choices * plan.max_tokens
    slot = None
    streaming = False
    try:
        slot = await engine.admit(state.knobs, plan.choices, kv, plan.lora, plan.words)
        stats.prompt_tokens_processed += plan.prompt_tokens
        engine.prompt_tokens += plan.prompt_tokens
        plan.cached_tokens = slot.cached_tokens
        await wait_first_token(engine, knobs, plan.prompt_tokens, slot.cached_tokens)
        if not plan.stream:
            produced = plan.choices * plan.max_tokens
            stats.tokens_sent += produced
            engine.generation_tokens += produced
            if render.usage_in_body:
                _count_usage(ex, plan)
            ex.send(200, render.body(), render.body_type)
            stats.completed += 1
            engine.success["length"] += 1
            return
        streaming = True
        stats.active += 1
        await _stream(ex, plan, render, fault == "cut")
    except asyncio.CancelledError:
        stats.cancelled += 1
        engine.success["abort"] += 1
    finally:
        if streaming:
            stats.active -= 1
        if slot is not None:
            engine.release(state.knobs, slot)


async def _stream(ex: Exchange, plan: Plan, render: Renderer, cut: bool) -> None:
    stats = ex.state.stats
    engine = ex.state.engine
    knobs = ex.knobs
    total = plan.choices * plan.max_tokens
    limit = min(knobs.cut_after, total) if cut else total
    ex.start_stream(render.content_type)
    if not knobs.itl_ms:
        batch = []
        for is_token, event in render.events():
            if is_token:
                if limit == 0:
                    break
                limit -= 1
            batch.append(event)
        sent = min(total, knobs.cut_after) if cut else total
        stats.tokens_sent += sent
        engine.generation_tokens += sent
        ex.emit(batch)
    else:
        delay = knobs.itl_ms / 1000
        seen = 0
        for is_token, event in render.events():
            if is_token:
                if limit == 0:
                    break
                limit -= 1
                # A new engine step: every choice's next token comes with it.
                if seen and seen % plan.choices == 0:
                    await asyncio.sleep(delay)
                seen += 1
                stats.tokens_sent += 1
                engine.generation_tokens += 1
            ex.emit([event])
    if cut and knobs.cut_after < total:
        ex.wire.abort()
        return
    ex.end_stream()
    if render.usage_in_stream:
        _count_usage(ex, plan)
    stats.completed += 1
    engine.success["length"] += 1


def _count_usage(ex: Exchange, plan: Plan) -> None:
    stats = ex.state.stats
    stats.prompt_tokens += plan.prompt_tokens
    stats.completion_tokens += plan.completion_tokens


async def answer(ex: Exchange, plan: Plan, body: bytes) -> None:
    """A pooling request (embeddings, score, rerank): faults, admission, the prefill time
    (ttft_ms plus prefill_ms_per_1k_tokens of the whole prompt: pooling prompts are not
    looked up in the prefix cache), then `body`. There are no tokens to stream, so `cut`
    does not apply."""
    if pick_fault(ex) == "done":
        return
    state = ex.state
    stats = state.stats
    engine = state.engine
    slot = None
    try:
        slot = await engine.admit(state.knobs, 1, plan.prompt_tokens, plan.lora, None)
        stats.prompt_tokens_processed += plan.prompt_tokens
        engine.prompt_tokens += plan.prompt_tokens
        await wait_first_token(engine, ex.knobs, plan.prompt_tokens, 0)
        stats.prompt_tokens += plan.prompt_tokens
        ex.send(200, body)
        stats.completed += 1
        engine.success["stop"] += 1
    except asyncio.CancelledError:
        stats.cancelled += 1
        engine.success["abort"] += 1
    finally:
        if slot is not None:
            engine.release(state.knobs, slot)
