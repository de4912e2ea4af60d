"""Benchmark: the gateway's replica choice, `GATEWAY_ROUTING=p2c` against `vllm`, on four
simulated vLLM replicas that pay for prefill and keep a prefix cache, in one run.

Four `tollgate-sim` replicas are shaped like a small vLLM engine: 8 sequences at once (more
wait), a prefix cache of 4096 blocks of 16 tokens, 10 ms to first token plus 60 ms per
1000 prompt tokens not in the cache, 5 ms per output token. Per routing mode one gateway
fronts all four, and every workload streams chat completions (max_tokens 16, so time to
first token dominates). A replica computes one prefill after another, so what saturates
first is prefill, not the 32 batch places; (a) and (b) run at a load the scorer's routing
keeps below that (prefill work about half of the four replicas' capacity), which is where
a router decides the tail, (c) above the batch places:

- (a) 16 multi-turn chats at once (arriving 50 ms apart), each with its own ~1500-word
  system prompt, 6 turns, the history resent each turn (a prefix the cache can hold, if
  the session's turns land on the replica that saw the previous one): a cold turn costs
  about 90 ms of prefill, a warm one 2;
- (b) 12 clients, 1 prompt in 5 long (~3000 words, each distinct: 180 ms of prefill), the
  rest short (~20 words);
- (c) 48 clients, uniform short prompts (~20 words).

Printed per workload and mode: requests, throughput, time to first content byte p50 and p99,
the prefix-cache hit rate summed over the four replicas (their vllm:prefix_cache_hits_total
over vllm:prefix_cache_queries_total, in tokens), the requests each replica served, and a
ratio row (first mode / second mode, TTFT); for (b) also its short prompts' TTFT alone (a
long prompt's own p99 is its prefill, which no routing shortens). Then fairness under
saturation: a light key's TTFT alone and while a heavy key sends 10 times its concurrency
(max_tokens 64, so the batches stay full). The replicas' caches and counters are reset
(POST /sim/reset) before every workload, so each starts cold in every mode. It passes or
fails nothing.

    .venv/bin/python bench/routing_bench.py [--quick] [--modes p2c,vllm,vllm+queue]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from gateway_bench import BIN, free_port, gateway_process, wait_http

REPLICAS = 4
MAX_NUM_SEQS = 8  # each replica's batch: more wait in its queue
SIM_SHAPE = (
    "--max-num-seqs", str(MAX_NUM_SEQS), "--prefix-cache-blocks", "4096", "--block-size", "16",
    "--ttft-ms", "10", "--prefill-ms-per-1k-tokens", "60", "--itl-ms", "5",
)  # fmt: skip
KEYS = {"bench": "sk-bench", "heavy": "sk-heavy", "light": "sk-light"}
MAX_TOKENS = 16
FAIR_MAX_TOKENS = 64
SHORT_WORDS, LONG_WORDS, SYSTEM_WORDS = 20, 3000, 1500
# (a)'s sessions arrive this far apart, so their cold first turns are not one burst that
# alone decides the p99 in both modes.
ARRIVAL_S = 0.05

Messages = list[dict[str, str]]


def words(count: int, tag: str) -> str:
    """`count` words (the simulator's tokens) that no other `tag` shares."""
    return " ".join(f"{tag}w{i}" for i in range(count))


def user(content: str) -> Messages:
    return [{"role": "user", "content": content}]


@contextlib.contextmanager
def simulators() -> Iterator[list[str]]:
    """REPLICAS simulators of SIM_SHAPE on free ports: their base URLs; stopped after."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for _ in range(REPLICAS):
            port = free_port()
            argv = [str(BIN / "tollgate-sim"), "--port", str(port), *SIM_SHAPE]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_http(url + "/health")
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


def reset(sims: list[str]) -> None:
    """Empty each replica's prefix cache and zero its counters."""
    for url in sims:
        urllib.request.urlopen(urllib.request.Request(url + "/sim/reset", method="POST")).close()


def counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cache_and_spread(sims: list[str]) -> tuple[float, float, list[int]]:
    """Prefix-cache hits and queries (tokens) summed over the replicas since the last
    reset, and the requests each one served."""
    hits = queries = 0.0
    spread = []
    for url in sims:
        with urllib.request.urlopen(url + "/metrics") as answer:
            text = answer.read().decode()
        hits += counter(text, "vllm:prefix_cache_hits_total")
        queries += counter(text, "vllm:prefix_cache_queries_total")
        with urllib.request.urlopen(url + "/sim/stats") as answer:
            spread.append(int(json.load(answer)["requests"]))
    return hits, queries, spread


@dataclass
class Run:
    """One workload through one gateway: every request's TTFT (s) and the wall time."""

    ttfts: list[float]
    seconds: float
    hits: float = 0.0
    queries: float = 0.0
    spread: tuple[int, ...] = ()
    # The TTFTs of the short prompts alone (what a long prompt ahead of them costs).
    shorts: list[float] = field(default_factory=list)

    def pct(self, p: float, shorts: bool = False) -> float:
        """The p-quantile of TTFT (of the short prompts only), in ms."""
        ordered = sorted(self.shorts if shorts else self.ttfts)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    @property
    def rps(self) -> float:
        return len(self.ttfts) / self.seconds

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def reply_text(raw: bytes) -> str:
    """The assistant's text in a chat completion stream."""
    parts = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


async def stream(
    session: aiohttp.ClientSession, url: str, key: str, messages: Messages, max_tokens: int
) -> tuple[float, bytes]:
    """One streamed chat: seconds to its first content byte, and the whole body."""
    body = {"model": "sim-llama", "messages": messages, "max_tokens": max_tokens, "stream": True}
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    start = time.perf_counter()
    async with session.post(url, data=json.dumps(body), headers=headers) as resp:
        if resp.status != 200:
            raise SystemExit(f"{url}: {resp.status} {await resp.text()}")
        first = None
        chunks = []
        async for chunk in resp.content.iter_any():
            if first is None and chunk:
                first = time.perf_counter() - start
            chunks.append(chunk)
    return first or 0.0, b"".join(chunks)


def client(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))


async def pool(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    prompts: Iterable[Messages],
    concurrency: int,
    max_tokens: int = MAX_TOKENS,
) -> Run:
    """`concurrency` clients taking the next prompt until there is none."""
    ttfts: list[float] = []
    shorts: list[float] = []
    todo = iter(prompts)

    async def worker() -> None:
        for messages in todo:
            ttft, _ = await stream(session, url, key, messages, max_tokens)
            ttfts.append(ttft)
            if messages[-1]["content"].count(" ") < SHORT_WORDS:
                shorts.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(ttfts, time.perf_counter() - start, shorts=shorts)


async def chats(url: str, sessions: int, turns: int) -> Run:
    """Workload (a): `sessions` conversations at once (arriving ARRIVAL_S apart), each turn
    sent after the last one's answer, with the whole history (the system prompt first)."""
    ttfts: list[float] = []

    async def chat(session: aiohttp.ClientSession, s: int) -> None:
        await asyncio.sleep(s * ARRIVAL_S)
        messages = [{"role": "system", "content": words(SYSTEM_WORDS, f"sys{s}")}]
        for t in range(turns):
            messages.append({"role": "user", "content": words(SHORT_WORDS, f"s{s}t{t}")})
            ttft, raw = await stream(session, url, KEYS["bench"], messages, MAX_TOKENS)
            ttfts.append(ttft)
            messages.append({"role": "assistant", "content": reply_text(raw)})

    async with client(sessions) as session:
        start = time.perf_counter()
        await asyncio.gather(*(chat(session, s) for s in range(sessions)))
        return Run(ttfts, time.perf_counter() - start)


def mixed(count: int) -> list[Messages]:
    """Workload (b): 1 in 5 long, every prompt distinct."""
    return [user(words(LONG_WORDS if i % 5 == 0 else SHORT_WORDS, f"m{i}")) for i in range(count)]


def short(count: int, tag: str) -> list[Messages]:
    """Distinct short prompts (built before the clock starts)."""
    return [user(words(SHORT_WORDS, f"{tag}{i}")) for i in range(count)]


async def prompts_through(url: str, prompts: Iterable[Messages], concurrency: int) -> Run:
    async with client(concurrency) as session:
        return await pool(session, url, KEYS["bench"], prompts, concurrency)


@dataclass
class Fairness:
    alone: Run
    shared: Run
    heavy: Run


async def fairness(url: str, light_c: int, light_n: int) -> Fairness:
    """The light key's requests alone, then again while the heavy key keeps 10 times as
    many in flight (from its first `heavy_c` answers on, so the batches are full)."""
    heavy_c = 10 * light_c
    heavy_ttfts: list[float] = []
    filled = asyncio.Event()
    stop = asyncio.Event()

    async def heavy(session: aiohttp.ClientSession, c: int) -> None:
        prompt = 0
        while not stop.is_set():
            prompt += 1
            messages = user(words(SHORT_WORDS, f"h{c}.{prompt}"))
            ttft, _ = await stream(session, url, KEYS["heavy"], messages, FAIR_MAX_TOKENS)
            heavy_ttfts.append(ttft)
            if len(heavy_ttfts) >= heavy_c:
                filled.set()

    async with client(light_c + heavy_c) as session:
        light = short(light_n, "la")
        alone = await pool(session, url, KEYS["light"], light, light_c, FAIR_MAX_TOKENS)
        start = time.perf_counter()
        heavies = [asyncio.create_task(heavy(session, c)) for c in range(heavy_c)]
        await filled.wait()
        light = short(light_n, "lb")
        shared = await pool(session, url, KEYS["light"], light, light_c, FAIR_MAX_TOKENS)
        stop.set()
        await asyncio.gather(*heavies)
        return Fairness(alone, shared, Run(heavy_ttfts, time.perf_counter() - start))


@dataclass
class Sizes:
    concurrency: int  # (c) and the fairness run's heavy key (10 x light_c)
    sessions: int  # (a)
    mix_concurrency: int  # (b)
    turns: int
    requests: int
    light_c: int
    light_n: int


def run_mode(mode: str, sims: list[str], tmp: str, sizes: Sizes) -> tuple[list[Run], Fairness]:
    """Every workload through one gateway routing by `mode`."""
    routing, _, extra = mode.partition("+")
    env = {
        "VLLM_URLS": ",".join(sims),
        "GATEWAY_ROUTING": routing,
        "UPSTREAM_HEALTH_INTERVAL_SECONDS": "0.5",
        "GATEWAY_API_KEYS": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
        "DATABASE_URL": f"sqlite:///{tmp}/{mode}-{time.monotonic_ns()}.db",
        "LOG_LEVEL": "WARNING",
    }
    if extra == "queue":  # the gateway's fair queues, at the replicas' batch size
        env["GATEWAY_UPSTREAM_MAX_IN_FLIGHT"] = str(MAX_NUM_SEQS)
    c = sizes.concurrency
    workloads: list[Callable[[str], Coroutine[Any, Any, Run]]] = [
        lambda url: chats(url, sizes.sessions, sizes.turns),
        lambda url: prompts_through(url, mixed(sizes.requests), sizes.mix_concurrency),
        lambda url: prompts_through(url, short(sizes.requests, "u"), c),
    ]
    with gateway_process(env) as (url, _):
        asyncio.run(prompts_through(url, short(2 * c, "warm"), c))  # connections, scrapes
        runs = []
        for workload in workloads:
            reset(sims)
            run = asyncio.run(workload(url))
            run.hits, run.queries, spread = cache_and_spread(sims)
            run.spread = tuple(spread)
            runs.append(run)
            print(f"  {mode}: workload {len(runs)} done in {run.seconds:.1f} s", file=sys.stderr)
        reset(sims)
        fair = asyncio.run(fairness(url, sizes.light_c, sizes.light_n))
    return runs, fair


def report(modes: list[str], results: list[tuple[list[Run], Fairness]], sizes: Sizes) -> None:
    names = [
        f"(a) chats {sizes.sessions}x{sizes.turns}",
        f"(b) 1/5 long, c={sizes.mix_concurrency}",
        f"(c) short, c={sizes.concurrency}",
    ]
    header = (
        f"{'workload':<22}{'mode':<10}{'req':>6}{'req/s':>8}{'TTFT p50':>10}{'p99 ms':>9}"
        f"{'cache hit':>11}   per replica"
    )
    print(header)
    print("-" * len(header))
    for w, name in enumerate(names):
        for i, (mode, (runs, _)) in enumerate(zip(modes, results, strict=True)):
            run = runs[w]
            print(
                f"{name if i == 0 else '':<22}{mode:<10}{len(run.ttfts):>6}{run.rps:>8.1f}"
                f"{run.pct(0.5):>10.1f}{run.pct(0.99):>9.1f}{run.hit_rate:>10.1%}"
                f"   {'/'.join(map(str, run.spread))}"
            )
        if len(results) >= 2:
            first, second = results[0][0][w], results[1][0][w]
            print(
                f"{'':<22}{f'{modes[0]}/{modes[1]}':<10}{'':>6}"
                f"{first.rps / second.rps:>8.2f}{first.pct(0.5) / second.pct(0.5):>10.2f}"
                f"{first.pct(0.99) / second.pct(0.99):>9.2f}"
            )
        if w == 1:  # the mix's short prompts alone: the wait behind a long one
            for i, (mode, (runs, _)) in enumerate(zip(modes, results, strict=True)):
                run = runs[w]
                print(
                    f"{'  its short prompts' if i == 0 else '':<22}{mode:<10}"
                    f"{len(run.shorts):>6}{'':>8}{run.pct(0.5, True):>10.1f}"
                    f"{run.pct(0.99, True):>9.1f}"
                )
    heavy_c = 10 * sizes.light_c
    print(
        f"\nfairness: light key c={sizes.light_c} alone, then with a heavy key c={heavy_c}"
        f" (max_tokens {FAIR_MAX_TOKENS}); TTFT ms"
    )
    header = (
        f"{'mode':<10}{'alone p50':>11}{'p99':>8}{'w/ heavy p50':>14}{'p99':>8}"
        f"{'p99 x':>7}{'heavy p50':>11}{'p99':>8}{'heavy req':>11}"
    )
    print(header)
    print("-" * len(header))
    for mode, (_, fair) in zip(modes, results, strict=True):
        print(
            f"{mode:<10}{fair.alone.pct(0.5):>11.1f}{fair.alone.pct(0.99):>8.1f}"
            f"{fair.shared.pct(0.5):>14.1f}{fair.shared.pct(0.99):>8.1f}"
            f"{fair.shared.pct(0.99) / fair.alone.pct(0.99):>7.2f}"
            f"{fair.heavy.pct(0.5):>11.1f}{fair.heavy.pct(0.99):>8.1f}{len(fair.heavy.ttfts):>11}"
        )
    print(
        "\nTTFT: time to the first content byte of the stream, at the client. cache hit:"
        " prompt tokens the replicas found cached / looked up.\nper replica: requests each"
        " simulator served (the warm-up excluded). p99 x: the light key's p99 with the heavy"
        " key / alone."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument(
        "--modes",
        default="p2c,vllm,vllm+queue",
        help="GATEWAY_ROUTING values, comma-separated, in order; +queue adds the fair queues"
        " (GATEWAY_UPSTREAM_MAX_IN_FLIGHT at the replicas' batch size)",
    )
    parser.add_argument("--concurrency", type=int, default=48, help="(c)'s clients")
    parser.add_argument("--sessions", type=int, default=16, help="(a)'s chats at once")
    parser.add_argument("--mix-concurrency", type=int, default=12, help="(b)'s clients")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    c, chats_c, mix_c = args.concurrency, args.sessions, args.mix_concurrency
    if args.quick:
        sizes = Sizes(c, chats_c, mix_c, turns=3, requests=2 * c, light_c=4, light_n=16)
    else:
        sizes = Sizes(c, chats_c, mix_c, turns=6, requests=8 * c, light_c=4, light_n=80)
    results = []
    with tempfile.TemporaryDirectory() as tmp, simulators() as sims:
        for mode in modes:
            results.append(run_mode(mode, sims, tmp, sizes))
    print(
        f"{REPLICAS} replicas: {' '.join(SIM_SHAPE)}\nmax_tokens {MAX_TOKENS},"
        f" modes {', '.join(modes)}\n"
    )
    report(modes, results, sizes)


if __name__ == "__main__":
    main()
