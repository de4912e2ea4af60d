"""Benchmark: `StreamTap.feed` over one 64-token stream, as vLLM writes it.

A stream is 64 content chunks, the usage chunk (`choices: []`) and `[DONE]`. It is fed in
reads of four shapes: one event per read (a lightly loaded vLLM flushes every token), 8
events per read, 1460-byte reads cut anywhere (one TCP segment each), and the whole stream
in one read; each with the usage chunk stripped (the client did not ask for it) and kept.
Prints CPU microseconds per stream (process time, so other processes on a busy machine
weigh less; the best of several repeats) and per read.

    .venv/bin/python bench/sse_bench.py [--module tollgate_gateway.sse ...] [--spaced]

Each `--module` is an implementation with the same interface (a copy of an older sse.py,
say); several are timed in alternation, so a machine's drift hits them alike. `--spaced`
writes the JSON with `json.dumps`' default spacing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import timeit
from collections.abc import Callable

TOKENS = 64


def stream(spaced: bool) -> list[bytes]:
    separators = (", ", ": ") if spaced else (",", ":")
    base = {
        "id": "chatcmpl-4f1c2a7e9b8d4c3fa1e2d3c4b5a69788",
        "object": "chat.completion.chunk",
        "created": 1795000000,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
    }

    def event(obj: dict[str, object]) -> bytes:
        return b"data: " + json.dumps({**base, **obj}, separators=separators).encode() + b"\n\n"

    content = [
        event(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": f" word{i}"},
                        "logprobs": None,
                        "finish_reason": None if i < TOKENS - 1 else "stop",
                    }
                ]
            }
        )
        for i in range(TOKENS)
    ]
    usage = event(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 25,
                "total_tokens": 25 + TOKENS,
                "completion_tokens": TOKENS,
            },
        }
    )
    return [*content, usage, b"data: [DONE]\n\n"]


def shapes(events: list[bytes]) -> dict[str, list[bytes]]:
    whole = b"".join(events)
    return {
        "1 event/read": events,
        "8 events/read": [b"".join(events[i : i + 8]) for i in range(0, len(events), 8)],
        "1460-byte reads": [whole[i : i + 1460] for i in range(0, len(whole), 1460)],
        "1 read": [whole],
    }


def feeder(
    tap_class: Callable[[bool], object], reads: list[bytes], strip: bool
) -> Callable[[], None]:
    def run() -> None:
        tap = tap_class(strip)
        feed = tap.feed  # type: ignore[attr-defined]
        for data in reads:
            feed(data)
        tap.flush()  # type: ignore[attr-defined]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", dest="modules")
    parser.add_argument("--spaced", action="store_true")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    modules = args.modules or ["tollgate_gateway.sse"]
    taps = [importlib.import_module(name).StreamTap for name in modules]
    events = stream(args.spaced)
    print(f"{TOKENS}-token stream, {len(b''.join(events))} bytes; CPU µs per stream (per read)")
    print(f"{'reads':<17}{'strip':>6}" + "".join(f"{name:>28}" for name in modules))
    for shape, reads in shapes(events).items():
        for strip in (True, False):
            timers = [
                timeit.Timer(feeder(tap, reads, strip), timer=time.process_time) for tap in taps
            ]
            number = max(1, 20_000 // len(reads))
            best = [float("inf")] * len(taps)
            for _ in range(args.repeat):
                for i, timer in enumerate(timers):
                    best[i] = min(best[i], timer.timeit(number) / number)
            cells = "".join(f"{b * 1e6:>18.1f} ({b * 1e6 / len(reads):6.2f})" for b in best)
            print(f"{shape:<17}{strip!s:>6}{cells}")


if __name__ == "__main__":
    main()
