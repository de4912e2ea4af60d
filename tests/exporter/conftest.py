"""Fixtures for the GPU exporter: a stand-in libnvidia-ml built from C, scripted GPU scenarios,
the real exporter as a subprocess scraped over HTTP, and a real kubelet pod-resources gRPC
server on a temporary Unix socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import Process, free_port, scaled

HERE = Path(__file__).parent
GIB = 1 << 30


# --- the stand-in NVML library --------------------------------------------------------------
def build_fake_nvml(out: Path, *defines: str) -> Path:
    """Compile fake_nvml.c into `out`, a directory LD_LIBRARY_PATH can point at."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("gcc is required to build the stand-in libnvidia-ml.so.1 (apt-get install gcc)")
    subprocess.run(
        [
            gcc,
            *defines,
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Werror",
            "-fvisibility=hidden",
            "-o",
            str(out / "libnvidia-ml.so.1"),
            str(HERE / "fake_nvml" / "fake_nvml.c"),
            "-lpthread",
        ],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture(scope="session")
def old_driver_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in as an older driver: no nvmlDeviceGetTemperatureV, no memory v2."""
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml-old"), "-DOLD_DRIVER")


def h100(index: int = 0, **over: Any) -> dict[str, Any]:
    gpu = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": f"GPU-11111111-2222-3333-4444-{index:012d}",
        "pci_bus_id": f"00000000:{0x18 + index:02X}:00.0",
        "cc_major": 9,
        "cc_minor": 0,
        "util_gpu": 87,
        "util_mem": 41,
        "mem_total": 80 * GIB,
        "mem_reserved": GIB // 2,
        "mem_used": 60 * GIB,
        "temp": 64,
        "mem_temp": 71,
        "power_mw": 612_500,
        "power_limit_mw": 700_000,
        "power_default_limit_mw": 700_000,
        "energy_mj": 123_456_789,
        "clock_sm": 1980,
        "clock_mem": 2619,
        "clock_graphics": 1980,
        "pstate": 0,
        "enc_util": 0,
        "dec_util": 3,
        "pcie_replay": 2,
        "pcie_gen": 5,
        "pcie_width": 16,
        "pcie_gen_max": 5,
        "pcie_width_max": 16,
        "clock_events": 0x4 | 0x40,  # sw power cap + hw thermal slowdown
        "viol_power_ns": 2_500_000_000,
        "viol_thermal_ns": 500_000_000,
        "ecc_corrected_volatile": 5,
        "ecc_corrected_aggregate": 17,
        "ecc_uncorrected_volatile": 0,
        "ecc_uncorrected_aggregate": 1,
        "remap_correctable": 3,
        "remap_uncorrectable": 0,
        "remap_pending": 1,
        "nvlink": 1,
        "nvlink_tx_kib": 1000,
        "nvlink_rx_kib": 2000,
        "gpm": 1,
        "gpm_sm_util": 75.0,
        "gpm_sm_occupancy": 50.0,
        "gpm_tensor": 25.0,
        "gpm_dram": 62.5,
        "procs": "4242:1073741824,4343:2147483648",
        "unsupported": "nvmlDeviceGetFanSpeed",  # data-centre boards have no fan reading
    }
    gpu.update(over)
    return gpu


def t4(index: int = 1, **over: Any) -> dict[str, Any]:
    """An older, smaller board: no GPM, no NVLink, no remapping, no memory temperature."""
    gpu = {
        "name": "Tesla T4",
        "uuid": f"GPU-aaaaaaaa-bbbb-cccc-dddd-{index:012d}",
        "pci_bus_id": f"00000000:{0x3B + index:02X}:00.0",
        "cc_major": 7,
        "cc_minor": 5,
        "util_gpu": 12,
        "util_mem": 4,
        "mem_total": 16 * GIB,
        "mem_reserved": 256 << 20,
        "mem_used": 2 * GIB,
        "temp": 45,
        "power_mw": 27_000,
        "power_limit_mw": 70_000,
        "power_default_limit_mw": 70_000,
        "energy_mj": 5_000_000,
        "clock_sm": 585,
        "clock_mem": 5000,
        "clock_graphics": 585,
        "fan": 34,
        "pstate": 8,
        "pcie_gen": 3,
        "pcie_width": 16,
        "pcie_gen_max": 3,
        "pcie_width_max": 16,
        "unsupported": (
            "nvmlDeviceGetRemappedRows,nvmlDeviceGetMigMode,field:82,nvmlDeviceGetMemoryInfo_v2"
        ),
    }
    gpu.update(over)
    return gpu


@dataclass
class Scenario:
    """The scripted GPU set; `write()` replaces the file atomically so the C side never reads
    half a file, and the library picks the change up on its next call."""

    path: Path
    system: dict[str, Any] = field(
        default_factory=lambda: {"driver": "550.54.15", "cuda": 12040, "init_error": 0, "epoch": 0}
    )
    gpus: list[dict[str, Any]] = field(default_factory=list)
    migs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    xids: list[tuple[int, int]] = field(default_factory=list)

    def write(self) -> Scenario:
        lines = ["[system]", *(f"{k} = {v}" for k, v in self.system.items())]
        for i, gpu in enumerate(self.gpus):
            lines += ["", "[gpu]", *(f"{k} = {v}" for k, v in gpu.items())]
            for mig in self.migs.get(i, []):
                lines += ["[mig]", *(f"{k} = {v}" for k, v in mig.items())]
        for gpu_index, xid in self.xids:
            lines += ["", "[xid]", f"gpu = {gpu_index}", f"xid = {xid}"]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)
        return self


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return Scenario(tmp_path / "gpus.ini", gpus=[h100(0), t4(1)]).write()


# --- scraping -------------------------------------------------------------------------------
@dataclass
class Scrape:
    text: str
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """Samples under the names on the wire: prometheus_client's parser appends `_total`
        to a counter whose name lacks it (dcgm-exporter's), which Prometheus does not."""
        on_wire = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines()}
        samples = [
            (_wire_name(s.name, on_wire), dict(s.labels), s.value)
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]
        return cls(text, samples)

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (lab, v)
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) == 1, f"expected one {name}{labels}, got {found}"
        return found[0][1]

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.find(name, **labels))

    def get(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """The one matching sample's value, or `default` when there is none: for polling."""
        found = self.find(name, **labels)
        return found[0][1] if len(found) == 1 else default


def _wire_name(name: str, on_wire: set[str]) -> str:
    return name if name in on_wire else name.removesuffix("_total")


class Exporter(Process):
    """The real `tollgate-gpu-exporter` process, on 127.0.0.1 and a free port."""

    def __init__(self, args: list[str], env: dict[str, str | None], log_path: Path) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "tollgate_exporter.main"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        super().__init__(argv, env, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def scrape(self, path: str = "/metrics") -> Scrape:
        status, headers, body = self.get(path)
        assert status == 200, body
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape.parse(body.decode())

    def wait_scrape(
        self,
        check: Callable[[Scrape], bool],
        timeout: float = 10.0,
        path: str = "/metrics",
        what: str = "",
    ) -> Scrape:
        """Poll scrapes until `check` holds (the deadline scaled for a busy machine); fails
        saying what it waited for, with the last scrape and the log."""
        deadline = time.monotonic() + scaled(timeout)
        last: Scrape | None = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exporter exited:\n{self.describe()}"
            # A check that asks for a series not exported yet fails its lookup: not yet.
            with contextlib.suppress(OSError, AssertionError):
                last = self.scrape(path)
                if check(last):
                    return last
            time.sleep(0.05)
        pytest.fail(
            f"{what or 'condition'} not met in {scaled(timeout):.0f} s\n--- last scrape ---\n"
            f"{last.text if last else None}\n{self.describe()}"
        )

    def wait_collects(self, n: int = 1, timeout: float = 10.0) -> Scrape:
        return self.wait_scrape(
            lambda s: (
                s.has("gpu_exporter_collects_total") and s.value("gpu_exporter_collects_total") >= n
            ),
            timeout,
        )


@pytest.fixture
def start_exporter(fake_nvml_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    """Start exporters against the stand-in library; all are stopped (SIGTERM) at tear-down."""
    started: list[Exporter] = []

    def start(
        scenario: Scenario | None = None,
        *args: str,
        lib_dir: Path | None = None,
        pod_socket: str = "",
        interval: float = 0.2,
    ) -> Exporter:
        env: dict[str, str | None] = {
            "LD_LIBRARY_PATH": str(lib_dir or fake_nvml_dir),
            "NODE_NAME": "gpu-node-7",
            "PYTHONUNBUFFERED": "1",
            "FAKE_NVML_SCENARIO": str(scenario.path) if scenario is not None else None,
        }
        exporter = Exporter(
            [
                "--interval",
                str(interval),
                "--pod-resources-socket",
                pod_socket,
                "--pod-resources-interval",
                "0.2",
                *args,
            ],
            env,
            tmp_path / f"exporter-{len(started)}.log",
        )
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        rc = exporter.stop()
        assert rc == 0, f"exporter did not exit cleanly on SIGTERM:\n{exporter.describe()}"


# --- kubelet pod-resources gRPC server --------------------------------------------------------
@pytest.fixture(scope="session")
def podresources_pb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """Generate protobuf + gRPC modules from the kubelet schema with grpcio-tools."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("pb")
    shutil.copy(HERE / "podresources_v1.proto", out / "podresources_v1.proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{out}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(out / "podresources_v1.proto"),
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    import podresources_v1_pb2 as pb
    import podresources_v1_pb2_grpc as pb_grpc

    return pb, pb_grpc


class Kubelet:
    """A real gRPC server speaking v1.PodResourcesLister on a Unix socket."""

    def __init__(self, pb: Any, pb_grpc: Any, socket_path: Path) -> None:
        import grpc

        self.pb = pb
        self.socket_path = socket_path
        self.pods: list[Any] = []
        self.calls = 0
        kubelet = self

        class Servicer(pb_grpc.PodResourcesListerServicer):
            def List(self, request: Any, context: Any) -> Any:
                kubelet.calls += 1
                return pb.ListPodResourcesResponse(pod_resources=kubelet.pods)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_PodResourcesListerServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"unix://{socket_path}")
        self.server.start()

    def pod(
        self,
        namespace: str,
        name: str,
        containers: dict[str, list[str]],
        resource: str = "nvidia.com/gpu",
    ) -> None:
        """A pod whose containers hold `resource` devices (plus a NIC whose id is "0")."""
        pb = self.pb
        self.pods.append(
            pb.PodResources(
                name=name,
                namespace=namespace,
                containers=[
                    pb.ContainerResources(
                        name=cname,
                        devices=[
                            pb.ContainerDevices(
                                resource_name=resource,
                                device_ids=ids,
                                topology=pb.TopologyInfo(nodes=[pb.NUMANode(ID=0)]),
                            ),
                            pb.ContainerDevices(resource_name="example.com/nic", device_ids=["0"]),
                        ],
                        cpu_ids=[2, 3],
                        memory=[pb.ContainerMemory(memory_type="memory", size=1 << 30)],
                    )
                    for cname, ids in containers.items()
                ],
            )
        )

    def stop(self) -> None:
        self.server.stop(grace=None).wait()


@pytest.fixture
def kubelet(podresources_pb: tuple[Any, Any], tmp_path: Path) -> Iterator[Kubelet]:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    short = Path(f"/tmp/tg-kubelet-{os.getpid()}-{time.monotonic_ns()}.sock")
    k = Kubelet(*podresources_pb, short)
    yield k
    k.stop()
    short.unlink(missing_ok=True)
