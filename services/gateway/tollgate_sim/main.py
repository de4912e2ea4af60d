"""`tollgate-sim`: run the vLLM-compatible upstream simulator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

from tollgate_sim.knobs import FAULTS, Knobs
from tollgate_sim.server import Simulator, describe


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Knobs]:
    parser = argparse.ArgumentParser(prog="tollgate-sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    defaults = Knobs()
    parser.add_argument("--model", default=defaults.model, help="the served model name")
    parser.add_argument("--default-tokens", type=int, default=defaults.default_tokens)
    parser.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    parser.add_argument("--itl-ms", type=float, default=defaults.itl_ms)
    parser.add_argument("--fault", choices=FAULTS, default=defaults.fault)
    parser.add_argument("--fault-rate", type=float, default=defaults.fault_rate)
    parser.add_argument("--error-status", type=int, default=defaults.error_status)
    parser.add_argument("--cut-after", type=int, default=defaults.cut_after)
    args = parser.parse_args(argv)
    knobs = Knobs(
        model=args.model,
        default_tokens=args.default_tokens,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        fault=args.fault,
        fault_rate=args.fault_rate,
        error_status=args.error_status,
        cut_after=args.cut_after,
    )
    try:
        knobs.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return args, knobs


async def serve(args: argparse.Namespace, knobs: Knobs) -> None:
    sim = Simulator(knobs, args.host, args.port)
    await sim.start()
    # One JSON line on stdout says where it listens: tests and the demo read it.
    print(json.dumps({"event": "listening", **describe(sim)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args, knobs = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args, knobs))


if __name__ == "__main__":
    main()
