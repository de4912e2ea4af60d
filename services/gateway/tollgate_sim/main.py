"""`tollgate-sim`: run the vLLM-compatible upstream simulator.

Every knob (see knobs.py) is also a flag, `--<knob-with-dashes>`. `--model` may be given
more than once (the first names answers, the rest are aliases, as vLLM's
--served-model-name), and so may `--lora NAME` (an adapter served as a model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
from collections.abc import Callable
from typing import Any

from tollgate_sim.knobs import (
    BEST_OF_MODES,
    BODY_MODES,
    FAULTS,
    JSON_STYLES,
    SSE_NEWLINES,
    Knobs,
    _bool,
)
from tollgate_sim.server import Simulator, describe

_CHOICES = {
    "fault": FAULTS,
    "json_style": JSON_STYLES,
    "body_mode": BODY_MODES,
    "sse_newline": SSE_NEWLINES,
    "best_of": BEST_OF_MODES,
}
_TYPES: dict[str, Callable[[Any], Any]] = {"str": str, "int": int, "float": float, "bool": _bool}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Knobs]:
    parser = argparse.ArgumentParser(prog="tollgate-sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", action="append", help="a served model name (repeatable)")
    parser.add_argument("--lora", action="append", default=[], help="a LoRA adapter (repeatable)")
    defaults = Knobs()
    for field in dataclasses.fields(Knobs):
        if field.name in ("model", "aliases", "loras"):
            continue
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_TYPES[str(field.type)],
            choices=_CHOICES.get(field.name),
            default=getattr(defaults, field.name),
        )
    args = parser.parse_args(argv)
    names = args.model or [defaults.model]
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Knobs)
        if f.name not in ("model", "aliases", "loras")
    }
    loras = [lora.split("=", 1)[0] for lora in args.lora]
    knobs = Knobs(model=names[0], aliases=",".join(names[1:]), loras=",".join(loras), **values)
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
