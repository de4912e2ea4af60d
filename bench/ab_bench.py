"""Benchmark: this working tree's gateway against an earlier commit's, taking turns.

One run of `gateway_bench.py` per variant cannot tell a 10 % change from the machine's
own drift (its speed moves by more than that within minutes). Here both gateways run at
once on one simulator and serve short bursts in turn, round after round (the order
swapped every round), so a change in the machine's speed hits both alike. Prints, per
workload, each gateway's median CPU ms per request over the rounds, their ratio, in how
many rounds the working tree used less, and each one's median p50 latency (time to the
first byte for streams) in ms.

    .venv/bin/python bench/ab_bench.py --baseline HEAD [--rounds 8] [--limits]

`--limits` puts the bench key under a policy with every limit on (as `quota_bench.py`
does), to judge a change to the quota path.

The baseline is checked out into a temporary git worktree and run from there, with this
environment's packages.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
from pathlib import Path

import psutil
from gateway_bench import BIN, CHAT, free_port, gateway_process, limits_env, measure, wait_http

ROOT = Path(__file__).resolve().parent.parent
STREAM = CHAT % (64, b',"stream":true')
WORKLOADS = (
    ("non-stream 16 tok c=32", CHAT % (16, b""), False, 32, 3000, {}),
    ("stream 64 tok c=32", STREAM, True, 32, 1500, {}),
    ("non-stream 16 tok c=1", CHAT % (16, b""), False, 1, 600, {}),
    ("stream 64 @5ms c=32", STREAM, True, 32, 320, {"x-sim-itl-ms": "5"}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--limits",
        action="store_true",
        help="both gateways with the bench key under a policy of every limit (as quota_bench)",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(tempfile.TemporaryDirectory(prefix="tollgate-ab-"))
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", tree, args.baseline],
            check=True,
            capture_output=True,
        )
        stack.callback(
            subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", tree]
        )
        sim_port = free_port()
        sim = subprocess.Popen(
            [str(BIN / "tollgate-sim"), "--port", str(sim_port)], stdout=subprocess.DEVNULL
        )
        stack.callback(sim.wait)
        stack.callback(sim.terminate)
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        code = f"{tree}/services/gateway:{tree}/services/contract"
        shared = {"VLLM_URL": f"http://127.0.0.1:{sim_port}", "GATEWAY_FORWARD_HEADERS": "x-sim-*"}
        if args.limits:
            shared |= limits_env(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        gateways = {
            name: stack.enter_context(gateway_process({**shared, **extra}))
            for name, extra in ((args.baseline, {"PYTHONPATH": code}), ("working tree", {}))
        }
        sim_proc = psutil.Process(sim.pid)
        base, new = gateways
        print(f"CPU ms per request, median of {args.rounds} rounds; baseline {args.baseline}\n")
        print(
            f"{'workload':<24}{'baseline':>10}{'working':>10}{'ratio':>8}  rounds lower"
            "   p50 ms baseline / working"
        )
        for label, body, stream, concurrency, n, knobs in WORKLOADS:
            cpu: dict[str, list[float]] = {base: [], new: []}
            p50: dict[str, list[float]] = {base: [], new: []}
            for round_ in range(args.rounds):
                for name in (base, new) if round_ % 2 == 0 else (new, base):
                    url, proc = gateways[name]
                    result = measure(proc, sim_proc, url, body, stream, concurrency, n, knobs)
                    cpu[name].append(result.cpu_target)
                    p50[name].append(result.pct(0.5))
            before, after = statistics.median(cpu[base]), statistics.median(cpu[new])
            lower = sum(a < b for a, b in zip(cpu[new], cpu[base], strict=True))
            print(
                f"{label:<24}{before:>10.3f}{after:>10.3f}{after / before:>8.3f}"
                f"  {lower:>5}/{args.rounds:<6}"
                f"  {statistics.median(p50[base]):.2f} / {statistics.median(p50[new]):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
