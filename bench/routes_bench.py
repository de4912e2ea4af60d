"""Benchmark: the gateway's CPU per request on each JSON route of the endpoint table, next to
chat's, in one run against one simulator (non-stream, concurrency 32).

Every route takes the same path through the gateway (the endpoint table); what differs is
the body it parses and the usage it reads, so the figures should stay close to chat's.

    .venv/bin/python bench/routes_bench.py [--requests 4000]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess

import psutil
from gateway_bench import BIN, free_port, gateway_process, measure, wait_http

ROUTES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
    "/v1/completions": {"prompt": "hi", "max_tokens": 16},
    "/v1/embeddings": {"input": "one two three"},
    "/v1/responses": {"input": "one two", "max_output_tokens": 16},
    "/v1/messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
    "/v1/rerank": {"query": "cat", "documents": ["the cat sat", "dogs run"]},
    "/v1/score": {"text_1": "cat", "text_2": ["the cat sat", "dogs run"]},
    "/tokenize": {"prompt": "hello big world"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    port = free_port()
    sim = subprocess.Popen(
        [str(BIN / "tollgate-sim"), "--port", str(port)], stdout=subprocess.DEVNULL
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        sim_proc = psutil.Process(sim.pid)
        env = {"VLLM_URL": f"http://127.0.0.1:{port}", "DATABASE_URL": "sqlite:///:memory:"}
        with gateway_process(env) as (chat_url, gateway):
            base = chat_url.rsplit("/v1/", 1)[0]
            print(f"{'route':<24}{'req/s':>8}{'gateway CPU ms/req':>20}{'sim CPU ms/req':>16}")
            for route, fields in ROUTES.items():
                body = json.dumps({"model": "sim-llama", **fields}).encode()
                result = measure(gateway, sim_proc, base + route, body, False, 32, args.requests)
                print(
                    f"{route:<24}{result.rps:>8.0f}{result.cpu_target:>20.3f}"
                    f"{result.cpu_sim:>16.3f}"
                )
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)


if __name__ == "__main__":
    main()
