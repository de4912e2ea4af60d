"""The real-GPU check of tollgate-gpu-exporter: one command, PASS/FAIL/SKIP per line.

Runs with the GPU machine's own Python 3.9+ and the repository's files; the only third-party
module is pynvml, taken from the machine if it has one, else from the wheel that
bench/gpu_check/prepare.sh downloads into bench/gpu_check/vendor/ (about 50 KiB). It never
changes GPU settings (no MIG, clock, power-limit or reset calls): it reads, and it puts load
on the GPU for about 40 s. Everything it sees is written to the output folder:

    runtime.json        kernel, uid, Python, pynvml version and origin, sandbox hints
    nvidia-smi.xml      `nvidia-smi -q -x` at idle; nvidia-smi-load.xml under load
    idle.prom, load.prom, idle-dcgm.prom   scrapes of the exporter (native and dcgm formats)
    nonroot.prom        a scrape of an exporter run as uid 65534 (when run as root)
    exporter*.log       the exporters' logs;  load.log  the load generator's output
    nvml-timing.json    every probe's NVML time per GPU
    report.txt          the PASS/FAIL/SKIP/INFO lines, also printed;  results.json

Exit status: 0 when no line FAILed, 1 otherwise, 2 when NVML could not be used at all.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXPORTER_SRC = REPO / "services" / "gpu-exporter"
LOAD_SECONDS = 40.0
INTERVAL = 1.0

Sample = tuple[str, dict[str, str], float]


# --- reporting ----------------------------------------------------------------------------------
class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[dict[str, str]] = []
        self._file = open(out / "report.txt", "w")  # noqa: SIM115 - closed in close()

    def line(self, status: str, check: str, detail: str = "") -> None:
        text = f"{status:<5} {check}" + (f": {detail}" if detail else "")
        print(text, flush=True)
        self._file.write(text + "\n")
        self._file.flush()
        self.lines.append({"status": status, "check": check, "detail": detail})

    def ok(self, cond: bool, check: str, detail: str = "") -> bool:
        self.line("PASS" if cond else "FAIL", check, detail)
        return cond

    def count(self, status: str) -> int:
        return sum(1 for x in self.lines if x["status"] == status)

    def close(self) -> None:
        summary = {s: self.count(s) for s in ("PASS", "FAIL", "SKIP", "INFO")}
        self.line("INFO", "summary", ", ".join(f"{k} {v}" for k, v in summary.items()))
        (self.out / "results.json").write_text(
            json.dumps({"summary": summary, "lines": self.lines}, indent=1)
        )
        self._file.close()


# --- the exposition -----------------------------------------------------------------------------
_LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:\\.|[^"\\])*)"')


def parse(text: str) -> list[Sample]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            labels = dict(_LABEL.findall(m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def find(samples: list[Sample], name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (lab, v)
        for n, lab, v in samples
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    ]


def one(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = find(samples, name, **labels)
    return found[0][1] if len(found) == 1 else None


# --- the exporter -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    def __init__(
        self, python: str, env: dict[str, str], log: Path, preexec: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        argv = [
            *(preexec or []),
            python,
            "-m",
            "tollgate_exporter.main",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--interval",
            str(INTERVAL),
            "--pod-resources-socket",
            "",
            "--format",
            "both",
        ]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def get(self, path: str = "/metrics") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def wait_collects(self, n: int, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                status, body = self.get()
                got = one(parse(body), "gpu_exporter_collects_total")
                if status == 200 and got is not None and got >= n:
                    return body
            time.sleep(0.2)
        raise RuntimeError(f"exporter did not reach {n} collects in {timeout:.0f}s")

    def next_scrape(self, timeout: float = 30.0) -> str:
        """A scrape from a collect that started after this call."""
        first = one(parse(self.get()[1]), "gpu_exporter_collects_total") or 0
        return self.wait_collects(int(first) + 2, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# --- nvidia-smi ---------------------------------------------------------------------------------
def smi_xml(out: Path, name: str) -> ET.Element | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run([smi, "-q", "-x"], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    (out / name).write_bytes(result.stdout)
    if result.returncode != 0:
        return None
    try:
        return ET.fromstring(result.stdout)
    except ET.ParseError:
        return None


def smi_number(gpu: ET.Element, *paths: str) -> float | None:
    """The first of `paths` that holds a number ("143771 MiB", "16x", "75.40 W")."""
    for path in paths:
        node = gpu.find(path)
        if node is not None and node.text:
            m = re.match(r"\s*(-?[\d.]+)", node.text)
            if m:
                return float(m.group(1))
    return None


SMI_FIELDS: dict[str, tuple[str, ...]] = {
    "memory_total_mib": ("fb_memory_usage/total",),
    "memory_used_mib": ("fb_memory_usage/used",),
    "memory_reserved_mib": ("fb_memory_usage/reserved",),
    "temperature": ("temperature/gpu_temp",),
    "power": (
        "gpu_power_readings/instant_power_draw",
        "gpu_power_readings/power_draw",
        "power_readings/power_draw",
        "gpu_power_readings/average_power_draw",
    ),
    "power_limit": (
        "gpu_power_readings/current_power_limit",
        "gpu_power_readings/enforced_power_limit",
        "power_readings/enforced_power_limit",
    ),
    "sm_clock": ("clocks/sm_clock",),
    "mem_clock": ("clocks/mem_clock",),
    "graphics_clock": ("clocks/graphics_clock",),
    "pcie_gen": ("pci/pci_gpu_link_info/pcie_gen/current_link_gen",),
    "pcie_width": ("pci/pci_gpu_link_info/link_widths/current_link_width",),
    "pcie_gen_max": ("pci/pci_gpu_link_info/pcie_gen/max_link_gen",),
    "pcie_width_max": ("pci/pci_gpu_link_info/link_widths/max_link_width",),
    "util": ("utilization/gpu_util",),
}
MIB = float(1 << 20)
# exporter family, label filter, nvidia-smi field, scale to smi's unit, absolute and relative
# tolerance. Dynamic readings are bracketed by an nvidia-smi read before and after the scrape.
COMPARISONS: tuple[tuple[str, dict[str, str], str, float, float, float], ...] = (
    ("gpu_memory_total_bytes", {}, "memory_total_mib", 1 / MIB, 1, 0),
    ("gpu_memory_used_bytes", {}, "memory_used_mib", 1 / MIB, 64, 0.02),
    ("gpu_memory_reserved_bytes", {}, "memory_reserved_mib", 1 / MIB, 1, 0),
    ("gpu_temperature_celsius", {}, "temperature", 1, 3, 0),
    ("gpu_power_watts", {}, "power", 1, 30, 0.25),
    ("gpu_power_limit_watts", {}, "power_limit", 1, 1, 0),
    ("gpu_sm_clock_hertz", {}, "sm_clock", 1e-6, 100, 0.25),
    ("gpu_memory_clock_hertz", {}, "mem_clock", 1e-6, 100, 0.1),
    ("gpu_graphics_clock_hertz", {}, "graphics_clock", 1e-6, 100, 0.25),
    ("gpu_pcie_link_generation", {}, "pcie_gen", 1, 1, 0),
    ("gpu_pcie_link_width", {}, "pcie_width", 1, 0, 0),
    ("gpu_pcie_link_generation_max", {}, "pcie_gen_max", 1, 0, 0),
    ("gpu_pcie_link_width_max", {}, "pcie_width_max", 1, 0, 0),
)


def smi_gpus(root: ET.Element | None) -> dict[str, dict[str, float | None]]:
    if root is None:
        return {}
    out = {}
    for gpu in root.findall("gpu"):
        uuid = (gpu.findtext("uuid") or "").strip()
        out[uuid] = {key: smi_number(gpu, *paths) for key, paths in SMI_FIELDS.items()}
    return out


def smi_pids(root: ET.Element | None) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    if root is None:
        return out
    for gpu in root.findall("gpu"):
        uuid = (gpu.findtext("uuid") or "").strip()
        out[uuid] = {int(p.findtext("pid") or 0) for p in gpu.findall("processes/process_info")}
    return out


# --- the checks ---------------------------------------------------------------------------------
ALWAYS = (
    "gpu_info",
    "gpu_lost",
    "gpu_utilization_percent",
    "gpu_memory_used_bytes",
    "gpu_memory_free_bytes",
    "gpu_memory_total_bytes",
    "gpu_temperature_celsius",
    "gpu_power_watts",
    "gpu_power_limit_watts",
    "gpu_energy_joules_total",
    "gpu_sm_clock_hertz",
    "gpu_memory_clock_hertz",
    "gpu_performance_state",
    "gpu_pcie_link_generation",
    "gpu_pcie_link_width",
    "gpu_clock_event_active",
    "gpu_clock_event_violation_seconds_total",
    "gpu_pcie_replay_total",
    "gpu_exporter_gpu_stale",
)
# Families a data-centre GPU of this compute capability has (driver >= 535)
BY_CAPABILITY: tuple[tuple[tuple[int, int], tuple[str, ...]], ...] = (
    ((7, 0), ("gpu_ecc_errors_total", "gpu_memory_reserved_bytes")),
    ((8, 0), ("gpu_remapped_rows", "gpu_row_remap_pending", "gpu_memory_temperature_celsius")),
    (
        (9, 0),
        (
            "gpu_gpm_graphics_active_ratio",
            "gpu_gpm_sm_active_ratio",
            "gpu_gpm_sm_occupancy_ratio",
            "gpu_gpm_tensor_active_ratio",
            "gpu_gpm_dram_active_ratio",
            "gpu_gpm_pcie_transmit_bytes_per_second",
        ),
    ),
)
OPTIONAL = (
    "gpu_fan_speed_percent",
    "gpu_encoder_utilization_percent",
    "gpu_decoder_utilization_percent",
    "gpu_power_default_limit_watts",
    "gpu_nvlink_transmit_bytes_total",
    "gpu_nvlink_errors_total",
    "gpu_retired_pages",
    "gpu_pcie_link_generation_max",
    "gpu_graphics_clock_hertz",
)


def gpus_of(samples: list[Sample]) -> list[dict[str, str]]:
    return [lab for lab, _ in find(samples, "gpu_info")]


def check_families(report: Report, samples: list[Sample], who: str) -> dict[str, set[str]]:
    """Every expected family present per GPU; which probes answered NOT_SUPPORTED."""
    unsupported: dict[str, set[str]] = {}
    for info in gpus_of(samples):
        g = {"uuid": info["uuid"]}
        cc = tuple(int(x) for x in (info.get("compute_capability") or "0.0").split("."))
        expected = list(ALWAYS)
        for since, names in BY_CAPABILITY:
            if cc >= since:
                expected += names
        if info.get("mig_mode") == "enabled":
            expected = [n for n in expected if n != "gpu_utilization_percent"]
            expected.append("gpu_mig_memory_used_bytes")
        missing = [n for n in expected if not find(samples, n, **g)]
        tag = f"GPU {info['gpu']} {info.get('model', '')} ({who})"
        report.ok(not missing, f"{tag}: expected families present", ", ".join(missing))
        optional = [n for n in OPTIONAL if find(samples, n, **g)]
        report.line("INFO", f"{tag}: optional families present", ", ".join(optional) or "none")
        calls = {lab["call"] for lab, _ in find(samples, "gpu_exporter_unsupported_metric", **g)}
        unsupported[info["uuid"]] = calls
        report.line("INFO", f"{tag}: NOT_SUPPORTED", ", ".join(sorted(calls)) or "none")
        failing = [lab["call"] for lab, _ in find(samples, "gpu_exporter_failing_metric", **g)]
        report.ok(not failing, f"{tag}: no probe failing", ", ".join(failing))
        report.ok(one(samples, "gpu_lost", **g) == 0, f"{tag}: not lost")
    return unsupported


def within(value: float, lo: float, hi: float, abs_tol: float, rel_tol: float) -> bool:
    slack = max(abs_tol, rel_tol * max(abs(lo), abs(hi)))
    return lo - slack <= value <= hi + slack


def compare_smi(
    report: Report,
    samples: list[Sample],
    before: dict[str, dict[str, float | None]],
    after: dict[str, dict[str, float | None]],
    phase: str,
) -> None:
    if not before:
        report.line("SKIP", f"{phase}: comparison with nvidia-smi", "no nvidia-smi here")
        return
    for info in gpus_of(samples):
        uuid = info["uuid"]
        a, b = before.get(uuid), after.get(uuid, {})
        if a is None:
            report.line("FAIL", f"{phase}: GPU {info['gpu']} in nvidia-smi", f"{uuid} missing")
            continue
        for family, match, key, scale, abs_tol, rel_tol in COMPARISONS:
            mine = one(samples, family, uuid=uuid, **match)
            ref = [v for v in (a.get(key), b.get(key)) if v is not None]
            check = f"{phase}: GPU {info['gpu']} {family} vs nvidia-smi {key}"
            if not ref:
                report.line("SKIP", check, "nvidia-smi does not show it")
                continue
            if mine is None:
                report.line("FAIL", check, f"exporter has none, nvidia-smi says {ref[0]:g}")
                continue
            value = mine * scale
            report.ok(
                within(value, min(ref), max(ref), abs_tol, rel_tol),
                check,
                f"exporter {value:.6g}, nvidia-smi {'..'.join(f'{r:g}' for r in ref)}",
            )


# --- load -----------------------------------------------------------------------------------
TORCH_LOAD = r"""
import sys, time, torch
assert torch.cuda.is_available(), "torch without CUDA"
gib = float(sys.argv[2])
hold = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda")  # per-process memory
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
x = torch.randn(1 << 28, device="cuda")
print("load: torch", torch.__version__, "on", torch.cuda.get_device_name(0), flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(20):
        c = a @ b          # tensor cores
    x.mul_(1.0001)         # DRAM traffic
    torch.cuda.synchronize()
print("load: done", flush=True)
"""

# A spin kernel in PTX, JIT-compiled by the driver (libcuda) through ctypes: load without
# torch or a CUDA toolkit. It keeps every SM busy with FMAs; it uses no tensor cores.
PTX = r"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry spin(.param .u64 out, .param .u32 iters)
{
  .reg .f32 %f<4>; .reg .u32 %r<4>; .reg .u64 %rd<4>; .reg .pred %p;
  ld.param.u64 %rd1, [out];
  ld.param.u32 %r1, [iters];
  mov.f32 %f1, 0f3F800000;
  mov.f32 %f2, 0f3F800001;
  mov.u32 %r2, 0;
LOOP:
  fma.rn.f32 %f1, %f1, %f2, %f2;
  add.u32 %r2, %r2, 1;
  setp.lt.u32 %p, %r2, %r1;
  @%p bra LOOP;
  mov.u32 %r3, %tid.x;
  mul.wide.u32 %rd2, %r3, 4;
  add.u64 %rd3, %rd1, %rd2;
  st.global.f32 [%rd3], %f1;
  ret;
}
"""

CTYPES_LOAD = r"""
import ctypes, sys, time
PTX = sys.stdin.read().encode() + b"\0"
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc, what):
    if rc != 0:
        raise SystemExit(f"load: {what} failed with CUDA error {rc}")
ok(cuda.cuInit(0), "cuInit")
dev = ctypes.c_int()
ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
ok(cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate")
mod = ctypes.c_void_p()
ok(cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(PTX)), "cuModuleLoadData")
fn = ctypes.c_void_p()
ok(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"spin"), "cuModuleGetFunction")
hold = ctypes.c_uint64()
size = ctypes.c_size_t(int(float(sys.argv[2]) * (1 << 30)))
ok(cuda.cuMemAlloc_v2(ctypes.byref(hold), size), "cuMemAlloc")
out = ctypes.c_uint64()
ok(cuda.cuMemAlloc_v2(ctypes.byref(out), ctypes.c_size_t(4 * 1024)), "cuMemAlloc")
p_out = ctypes.c_uint64(out.value)
p_iters = ctypes.c_uint32(2_000_000)
args = (ctypes.c_void_p * 2)(ctypes.cast(ctypes.byref(p_out), ctypes.c_void_p),
                             ctypes.cast(ctypes.byref(p_iters), ctypes.c_void_p))
print("load: PTX spin kernel via libcuda", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    ok(cuda.cuLaunchKernel(fn, 4096, 1, 1, 1024, 1, 1, 0, None, args, None), "cuLaunchKernel")
    ok(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
print("load: done", flush=True)
"""


def start_load(python: str, out: Path, seconds: float, gib: float) -> tuple[Any, str]:
    """(process, kind): torch if this Python has it with CUDA, else a PTX kernel via libcuda."""
    log = open(out / "load.log", "wb")  # noqa: SIM115 - the process owns it until it exits
    probe = subprocess.run(
        [python, "-c", "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
        capture_output=True,
        timeout=120,
    )
    if probe.returncode == 0:
        proc = subprocess.Popen(
            [python, "-c", TORCH_LOAD, str(seconds), str(gib)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return proc, "torch"
    lib = subprocess.run(
        [python, "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"], capture_output=True
    )
    if lib.returncode == 0:
        proc = subprocess.Popen(
            [python, "-c", CTYPES_LOAD, str(seconds), str(gib)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(PTX.encode())
        proc.stdin.close()
        return proc, "ptx"
    log.close()
    return None, "none"


def stop(proc: Any) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def check_load(
    report: Report,
    exp: Exporter,
    idle: list[Sample],
    python: str,
    out: Path,
    smi_idle: dict[str, dict[str, float | None]],
) -> None:
    gib = 4.0
    proc, kind = start_load(python, out, LOAD_SECONDS, gib)
    if proc is None:
        report.line(
            "SKIP",
            "load checks (utilization, GPM, process memory, energy vs power)",
            "no load generator: neither torch with CUDA nor libcuda.so.1 here",
        )
        return
    report.line("INFO", "load generator", f"{kind}, pid {proc.pid}, {LOAD_SECONDS:.0f} s")
    try:
        time.sleep(12)  # CUDA start-up, then clocks and GPM windows settle
        if proc.poll() is not None:
            log = (out / "load.log").read_text(errors="replace")[-800:]
            report.line("FAIL", "load generator runs", f"exited {proc.returncode}: {log}")
            return
        loaded: list[list[Sample]] = []
        bodies = []
        smi_before = smi_gpus(smi_xml(out, "nvidia-smi-load.xml"))
        for _ in range(8):
            body = exp.next_scrape()
            bodies.append(body)
            loaded.append(parse(body))
            time.sleep(1.0)
        smi_after_root = smi_xml(out, "nvidia-smi-load-after.xml")
        (out / "load.prom").write_text(bodies[-1])
    finally:
        stop(proc)
    last = loaded[-1]
    # the load runs on CUDA device 0; find it among the GPUs: the busiest one
    gpus = gpus_of(last)
    busy = max(gpus, key=lambda g: one(last, "gpu_utilization_percent", uuid=g["uuid"]) or 0)
    g = {"uuid": busy["uuid"]}
    tag = f"load on GPU {busy['gpu']}"
    utils = [one(s, "gpu_utilization_percent", **g) or 0 for s in loaded]
    idle_util = one(idle, "gpu_utilization_percent", **g) or 0
    report.ok(min(utils) >= 80, f"{tag}: utilization under load", f"{utils} (idle {idle_util:g})")
    gpm = {
        name: [one(s, name, **g) for s in loaded]
        for name in (
            "gpu_gpm_graphics_active_ratio",
            "gpu_gpm_sm_active_ratio",
            "gpu_gpm_tensor_active_ratio",
            "gpu_gpm_dram_active_ratio",
            "gpu_gpm_sm_occupancy_ratio",
        )
    }
    if all(v is None for vs in gpm.values() for v in vs):
        report.line("SKIP", f"{tag}: GPM under load", "no GPM on this GPU")
    else:
        for name, floor in (
            ("gpu_gpm_graphics_active_ratio", 0.8),
            ("gpu_gpm_sm_active_ratio", 0.5),
            ("gpu_gpm_sm_occupancy_ratio", 0.05),
        ):
            vals = [v for v in gpm[name] if v is not None]
            report.ok(bool(vals) and statistics.median(vals) >= floor, f"{tag}: {name}", str(vals))
        tensor = [v for v in gpm["gpu_gpm_tensor_active_ratio"] if v is not None]
        if kind == "torch":
            report.ok(
                bool(tensor) and statistics.median(tensor) >= 0.05, f"{tag}: tensor", str(tensor)
            )
        else:
            report.line("INFO", f"{tag}: tensor (PTX load uses none)", str(tensor))
        idle_sm = one(idle, "gpu_gpm_sm_active_ratio", **g)
        report.ok(
            idle_sm is not None and idle_sm < 0.2,
            f"{tag}: GPM SM active idle vs load",
            f"idle {idle_sm}, load {gpm['gpu_gpm_sm_active_ratio']}",
        )
    # per-process memory: the load's pid, with at least what it allocated
    procs = {lab["pid"]: v for lab, v in find(last, "gpu_process_memory_used_bytes", **g)}
    pid = str(proc.pid)
    if pid in procs:
        report.ok(
            procs[pid] >= gib * (1 << 30),
            f"{tag}: process memory of pid {pid}",
            f"{procs[pid] / (1 << 30):.2f} GiB",
        )
    elif procs:
        report.line(
            "FAIL",
            f"{tag}: process memory of pid {pid}",
            f"pids seen: {sorted(procs)} (another PID namespace?)",
        )
    else:
        report.line("FAIL", f"{tag}: process memory", "no gpu_process_memory_used_bytes under load")
    pids = smi_pids(smi_after_root).get(busy["uuid"], set())
    if pids:
        report.ok(
            set(procs) >= {str(p) for p in pids if p},
            f"{tag}: processes match nvidia-smi",
            f"smi {sorted(pids)}, exporter {sorted(procs)}",
        )
    # energy vs power: the counter's slope against the mean of the power readings
    e = [
        (
            one(s, "gpu_exporter_gpu_last_collect_timestamp_seconds", **g),
            one(s, "gpu_energy_joules_total", **g),
        )
        for s in loaded
    ]
    power = [one(s, "gpu_power_watts", **g) or 0 for s in loaded]
    (t0, e0), (t1, e1) = e[0], e[-1]
    if None in (t0, e0, t1, e1) or t1 == t0:
        report.line("FAIL", f"{tag}: energy vs power", f"energy/time missing: {e}")
    else:
        slope = (e1 - e0) / (t1 - t0)
        mean = statistics.mean(power)
        report.ok(
            0.75 <= slope / mean <= 1.25,
            f"{tag}: energy slope vs mean power",
            f"{slope:.1f} W vs {mean:.1f} W",
        )
    idle_power = one(idle, "gpu_power_watts", **g) or 0
    report.ok(
        statistics.mean(power) > idle_power + 30,
        f"{tag}: power rises under load",
        f"idle {idle_power:.0f} W, load {statistics.mean(power):.0f} W",
    )
    compare_smi(report, last, smi_before, smi_gpus(smi_after_root), "loaded")
    smi_util = [x.get(busy["uuid"], {}).get("util") for x in (smi_before,)]
    if smi_util and smi_util[0] is not None:
        report.ok(
            abs(smi_util[0] - utils[0]) <= 15,
            f"{tag}: utilization vs nvidia-smi",
            f"exporter {utils[0]}, smi {smi_util[0]}",
        )


def check_concurrent(report: Report, exp: Exporter, clients: int = 20, seconds: float = 8) -> None:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=10)
        mine = []
        try:
            while time.monotonic() < end:
                t = time.perf_counter()
                conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
                conn.getresponse().read()
                mine.append(time.perf_counter() - t)
        except OSError as exc:
            errors.append(str(exc))
        finally:
            conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.sort()
    p50 = lat[len(lat) // 2] * 1e3 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan")
    report.ok(
        not errors and p99 < 100,
        f"{clients} concurrent scrapers for {seconds:.0f}s",
        f"{len(lat)} scrapes, p50 {p50:.2f} ms, p99 {p99:.2f} ms, errors {len(errors)}",
    )


def time_nvml_calls(report: Report, out: Path, rounds: int = 10) -> None:
    """Each probe's NVML time per GPU, in this process, through the exporter's own code."""
    from tollgate_exporter.nvml import Nvml, NvmlError
    from tollgate_exporter.probes import make_probes

    nv = Nvml()
    t = time.perf_counter()
    try:
        nv.init()
    except NvmlError as exc:
        report.line("FAIL", "NVML timing", str(exc))
        return
    timing: dict[str, Any] = {"nvmlInit_ms": (time.perf_counter() - t) * 1e3, "gpus": {}}
    try:
        for index in range(nv.device_count()):
            h = nv.handle(index)
            probes = make_probes()
            per: dict[str, dict[str, Any]] = {}
            for name, probe in probes:
                times = []
                result = "ok"
                for _ in range(rounds):
                    t = time.perf_counter()
                    try:
                        list(probe(nv, h))
                    except NvmlError as exc:
                        result = type(exc).__name__
                    times.append((time.perf_counter() - t) * 1e3)
                    time.sleep(0.11 if name in ("gpm", "mig") else 0)  # GPM windows >= 100 ms
                per[name] = {
                    "p50_ms": statistics.median(times),
                    "max_ms": max(times),
                    "result": result,
                }
            for _, probe in probes:
                close = getattr(probe, "close", None)
                if close:
                    close(nv)
            timing["gpus"][str(index)] = per
            total = sum(p["p50_ms"] for p in per.values())
            slow = sorted(((p["p50_ms"], n) for n, p in per.items()), reverse=True)[:3]
            report.line(
                "INFO",
                f"GPU {index}: NVML time per collect (sum of probe p50s)",
                f"{total:.2f} ms; slowest " + ", ".join(f"{n} {ms:.2f} ms" for ms, n in slow),
            )
            report.ok(
                total < 250,
                f"GPU {index}: a collect's NVML calls fit in the 5 s interval",
                f"{total:.1f} ms",
            )
    finally:
        with contextlib.suppress(NvmlError):
            nv.shutdown()
    (out / "nvml-timing.json").write_text(json.dumps(timing, indent=1))


# --- runtime --------------------------------------------------------------------------------
def pynvml_origin(out: Path) -> str:
    """Put a pynvml on sys.path: the machine's own, else the vendored wheel."""
    try:
        import pynvml  # noqa: F401

        return "machine"
    except ImportError:
        pass
    wheels = sorted(glob.glob(str(HERE / "vendor" / "nvidia_ml_py-*.whl")))
    if not wheels:
        return ""
    sys.path.insert(0, wheels[-1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [wheels[-1], *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return "vendored " + Path(wheels[-1]).name


def runtime(out: Path, origin: str) -> dict[str, Any]:
    import pynvml

    info: dict[str, Any] = {
        "kernel": platform.uname()._asdict(),
        "proc_version": Path("/proc/version").read_text().strip()
        if Path("/proc/version").exists()
        else "",
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "python": sys.version,
        "python_executable": sys.executable,
        "pynvml_file": getattr(pynvml, "__file__", ""),
        "pynvml_origin": origin,
        "nvidia_smi": shutil.which("nvidia-smi") or "",
        "cgroup": Path("/proc/self/cgroup").read_text()[:2000]
        if Path("/proc/self/cgroup").exists()
        else "",
    }
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["pynvml_version"] = version("nvidia-ml-py")
    if "pynvml_version" not in info:
        m = re.search(r"nvidia_ml_py-([\d.]+)", info["pynvml_file"])
        info["pynvml_version"] = m.group(1) if m else "unknown"
    info["sandbox_hint"] = (
        "gVisor"
        if "gVisor" in info["proc_version"] or info["kernel"]["release"].startswith("4.4.0")
        else ""
    )
    (out / "runtime.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "", help="output folder")
    ap.add_argument("--no-load", action="store_true", help="skip the load phase")
    opts = ap.parse_args()
    out = Path(opts.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    started = time.monotonic()
    origin = pynvml_origin(out)
    if not origin:
        report.line("FAIL", "pynvml importable", "none here: run bench/gpu_check/prepare.sh")
        report.close()
        return 2
    sys.path.insert(0, str(EXPORTER_SRC))
    info = runtime(out, origin)
    report.line(
        "INFO",
        "runtime",
        f"kernel {info['kernel']['release']}, uid {info['uid']}, Python "
        f"{platform.python_version()}, pynvml {info['pynvml_version']} ({origin})"
        + (f", sandbox: {info['sandbox_hint']}" if info["sandbox_hint"] else ""),
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(EXPORTER_SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "PYTHONUNBUFFERED": "1",
        "NODE_NAME": socket.gethostname(),
    }
    root_smi = smi_xml(out, "nvidia-smi.xml")
    if root_smi is None:
        report.line("SKIP", "nvidia-smi -q -x", "no nvidia-smi here (or it failed)")
    else:
        report.line("INFO", "nvidia-smi", (root_smi.findtext("driver_version") or "").strip())
    exp = Exporter(sys.executable, env, out / "exporter.log")
    try:
        try:
            idle_body = exp.wait_collects(3)
        except RuntimeError as exc:
            log = (out / "exporter.log").read_text(errors="replace")
            report.line("FAIL", "exporter starts and collects", f"{exc}: {log[-1500:]}")
            return 2
        smi_before = smi_gpus(root_smi)
        idle_body = exp.next_scrape()
        smi_after = smi_gpus(smi_xml(out, "nvidia-smi-after.xml"))
        (out / "idle.prom").write_text(idle_body)
        idle = parse(idle_body)
        up = one(idle, "gpu_exporter_nvml_up") == 1
        report.ok(up, "NVML up in the exporter", f"{one(idle, 'gpu_exporter_gpus')} GPU(s)")
        if not up:
            log = (out / "exporter.log").read_text(errors="replace")
            report.line("INFO", "exporter log", log[-1500:])
            return 2
        status, dcgm_body = exp.get("/metrics/dcgm")
        (out / "idle-dcgm.prom").write_text(dcgm_body)
        report.ok(
            status == 200 and "DCGM_FI_DEV_GPU_UTIL{" in dcgm_body,
            "dcgm-compatible exposition",
            f"{sum(1 for s in parse(dcgm_body) if s[0].startswith('DCGM_'))} DCGM series",
        )
        for path in ("/health", "/ready"):
            status, body = exp.get(path)
            report.ok(status == 200, f"{path} at idle", body.strip())
        duration = one(idle, "gpu_exporter_collect_duration_seconds") or 0
        rounds = [v for _, v in find(idle, "gpu_exporter_gpu_collect_duration_seconds")]
        report.line(
            "INFO",
            "collect",
            f"snapshot {duration * 1e3:.2f} ms; NVML round per GPU "
            + ", ".join(f"{r * 1e3:.1f} ms" for r in rounds),
        )
        status_text = Path(f"/proc/{exp.proc.pid}/status").read_text()
        rss = next((x.split()[1] for x in status_text.splitlines() if x.startswith("VmRSS")), "0")
        report.line("INFO", "exporter RSS", f"{int(rss) / 1024:.1f} MiB")
        unsupported = check_families(report, idle, f"as uid {os.getuid()}")
        compare_smi(report, idle, smi_before, smi_after, "idle")
        check_nonroot(report, env, out, unsupported)
        if opts.no_load:
            report.line("SKIP", "load checks", "--no-load")
        else:
            check_load(report, exp, idle, sys.executable, out, smi_before)
        check_concurrent(report, exp)
    finally:
        exp.stop()
    time_nvml_calls(report, out)
    report.line("INFO", "wall time", f"{time.monotonic() - started:.0f} s")
    failed = report.count("FAIL")
    report.close()
    return 1 if failed else 0


def check_nonroot(
    report: Report, env: dict[str, str], out: Path, as_root: dict[str, set[str]]
) -> None:
    """What NVML refuses a non-root exporter (the DaemonSet's usual securityContext)."""
    if os.geteuid() != 0:
        report.line("SKIP", "NOT_SUPPORTED as non-root vs root", "not running as root")
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        report.line("SKIP", "NOT_SUPPORTED as non-root vs root", "no setpriv here")
        return
    pre = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    exp = Exporter(sys.executable, env, out / "exporter-nonroot.log", preexec=pre)
    try:
        try:
            body = exp.wait_collects(3, timeout=45)
        except RuntimeError as exc:
            log = (out / "exporter-nonroot.log").read_text(errors="replace")[-500:]
            report.line("SKIP", "exporter as uid 65534", f"{exc}: {log}")
            return
        (out / "nonroot.prom").write_text(body)
        samples = parse(body)
        nonroot = check_families(report, samples, "as uid 65534")
        for uuid, calls in nonroot.items():
            extra = calls - as_root.get(uuid, set())
            report.line(
                "INFO",
                f"{uuid}: NOT_SUPPORTED only as non-root",
                ", ".join(sorted(extra)) or "none",
            )
    finally:
        exp.stop()


if __name__ == "__main__":
    sys.exit(main())
