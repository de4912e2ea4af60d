"""Real scrapes for the monitoring checks: a gateway in front of the simulator after traffic
that touches every metric family (streams, rejections, an upstream failure that opens and
closes the breaker, quota flushes), the GPU exporter with `--fake-gpus`, and the exporter
over the stand-in libnvidia-ml (tests/exporter/fake_nvml) with an XID event, since
simulated GPUs never raise one. All are processes on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from promql import sample_names
from servers import BIN, KEY_A, Gateway, Process, Sim, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
FAKE_NVML_C = ROOT / "tests" / "exporter" / "fake_nvml" / "fake_nvml.c"
CHAT = "/v1/chat/completions"
BODY = {"model": "sim-llama", "messages": [{"role": "user", "content": "hi"}]}


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is required and not on PATH: install Debian's `{package}` package"
            " (`make test` does it through scripts/ensure-tools.sh)"
        )
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


def _get(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    return response.text if response.status_code == 200 else None


@pytest.fixture(scope="session")
def gateway_scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("monitoring-gateway")
    sim = Sim(tmp)
    try:
        gateway = Gateway(
            tmp,
            sim.url,
            {
                "BREAKER_FAILURE_THRESHOLD": "1",
                "BREAKER_OPEN_SECONDS": "0.3",
                "QUOTA_FLUSH_INTERVAL_SECONDS": "0.1",
                # The replica-choice families too: the vLLM scorer and the fair queue.
                "GATEWAY_ROUTING": "vllm",
                "GATEWAY_ROUTING_SCRAPE_SECONDS": "0.1",
                "GATEWAY_UPSTREAM_MAX_IN_FLIGHT": "64",
            },
        )
        try:
            yield _exercise(gateway)
        finally:
            gateway.stop()
    finally:
        sim.stop()


def _exercise(gateway: Gateway) -> str:
    """Traffic that brings out every metric family; the scrape once they are all there."""
    auth = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.post(CHAT, json=BODY, headers=auth).status_code == 200
        with client.stream("POST", CHAT, json={**BODY, "stream": True}, headers=auth) as r:
            assert r.status_code == 200
            assert "data: [DONE]" in r.read().decode()
        bad_key = {"Authorization": "Bearer sk-not-a-key"}
        assert client.post(CHAT, json=BODY, headers=bad_key).status_code == 401
        # one upstream 500 opens the breaker (threshold 1): the next request is refused at
        # once; after 0.3 s a probe goes through and closes it again
        failing = {**auth, "x-sim-fault": "error"}
        assert client.post(CHAT, json=BODY, headers=failing).status_code == 500
        assert client.post(CHAT, json=BODY, headers=auth).status_code == 503

        def probe_closes_breaker() -> bool:
            return client.post(CHAT, json=BODY, headers=auth).status_code == 200

        wait_until(probe_closes_breaker, timeout=5, interval=0.1)

    wanted = {
        "tollgate_requests_total",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_time_to_first_token_seconds_bucket",
        "tollgate_time_per_output_token_seconds_bucket",
        "tollgate_gateway_overhead_seconds_bucket",
        "tollgate_upstream_latency_seconds_bucket",
        "tollgate_tokens_total",
        "tollgate_rejections_total",
        "tollgate_upstream_errors_total",
        "tollgate_circuit_breaker_transitions_total",
        "tollgate_quota_flush_duration_seconds_bucket",
        "tollgate_upstream_vllm_requests_running",
        "tollgate_upstream_prefill_bytes",
        "tollgate_queue_waiting",
    }

    def complete() -> str | None:
        text = _get(gateway.url + "/metrics")
        if text and wanted <= sample_names(text) and 'to_state="closed"' in text:
            return text
        return None

    return wait_until(complete, timeout=10, interval=0.1)


class Exporter(Process):
    def __init__(self, tmp: Path, args: list[str], env: dict[str, str], name: str) -> None:
        self.port = free_port()
        argv = [
            str(BIN / "tollgate-gpu-exporter"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--pod-resources-socket",
            "",
            "--interval",
            "0.2",
            "--node-name",
            "gpu-node-1",
            *args,
        ]
        super().__init__(argv, env, tmp / f"{name}.log")
        self.url = f"http://127.0.0.1:{self.port}"

    def scrape_when(self, *names: str, timeout: float = 10) -> str:
        def ready() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited:\n{self.output()}")
            text = _get(self.url + "/metrics")
            return text if text and set(names) <= sample_names(text) else None

        return wait_until(ready, timeout=timeout, interval=0.05)


@pytest.fixture(scope="session")
def fake_gpus_scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("monitoring-fake-gpus")
    exporter = Exporter(tmp, ["--fake-gpus", "2"], {}, "exporter-fake")
    try:
        yield exporter.scrape_when("gpu_temperature_celsius", "gpu_exporter_nvml_up")
    finally:
        exporter.stop()


SCENARIO = """\
[system]
driver = 550.54.15
cuda = 12040

[gpu]
name = NVIDIA H100 80GB HBM3
uuid = GPU-11111111-2222-3333-4444-000000000000
pci_bus_id = 00000000:18:00.0
temp = 64
mem_temp = 71
power_mw = 612500
power_limit_mw = 700000
nvlink = 1
gpm = 1
"""


@pytest.fixture(scope="session")
def nvml_scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The exporter on the real pynvml path over the stand-in library, after one XID."""
    gcc = require_tool("gcc", "gcc")
    tmp = tmp_path_factory.mktemp("monitoring-nvml")
    library = tmp / "libnvidia-ml.so.1"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O1", "-o", str(library), str(FAKE_NVML_C), "-lpthread"],
        check=True,
    )
    scenario = tmp / "gpus.ini"
    scenario.write_text(SCENARIO)
    env = {"LD_LIBRARY_PATH": str(tmp), "FAKE_NVML_SCENARIO": str(scenario)}
    exporter = Exporter(tmp, [], env, "exporter-nvml")
    try:
        exporter.scrape_when("gpu_temperature_celsius")
        staged = tmp / "gpus.tmp"
        staged.write_text(SCENARIO + "\n[xid]\ngpu = 0\nxid = 79\n")
        staged.replace(scenario)
        yield exporter.scrape_when("gpu_xid_errors_total")
    finally:
        exporter.stop()


@pytest.fixture(scope="session")
def scraped_names(gateway_scrape: str, fake_gpus_scrape: str, nvml_scrape: str) -> set[str]:
    return sample_names(gateway_scrape) | sample_names(fake_gpus_scrape) | sample_names(nvml_scrape)
