"""Simulated GPUs behind the pynvml function names `nvml.Nvml` uses (`--fake-gpus N`).

For demos, dashboards, benchmarks and fast unit tests: values move with time so graphs look
alive. Anything this fake does not implement answers FUNCTION_NOT_FOUND, exactly like an old
driver, so it also exercises the skip-unsupported path.
"""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1 << 30

MODELS = (
    ("NVIDIA H100 80GB HBM3", 80, 700_000, (9, 0)),
    ("NVIDIA A100-SXM4-40GB", 40, 400_000, (8, 0)),
    ("NVIDIA L4", 24, 72_000, (8, 9)),
    ("Tesla T4", 16, 70_000, (7, 5)),
)


class FakeGpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.name, mem_gib, self.limit_mw, self.cc = MODELS[index % len(MODELS)]
        self.total = mem_gib * GIB
        self.uuid = f"GPU-fa6e0000-0000-4000-8000-{index:012x}"
        self.bus_id = f"00000000:{0x17 + index:02X}:00.0"
        self.phase = index * 0.7
        self.started = time.monotonic()

    def wave(self, period: float, low: float, high: float) -> float:
        t = time.monotonic() - self.started
        return low + (high - low) * (0.5 + 0.5 * math.sin(2 * math.pi * t / period + self.phase))


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class FakeBinding:
    """A pynvml-shaped object with N simulated GPUs."""

    def __init__(self, count: int) -> None:
        self.gpus = [FakeGpu(i) for i in range(count)]
        self._events = threading.Event()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("nvml"):

            def missing(*_args: Any) -> Any:
                raise _err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

            return missing
        raise AttributeError(name)

    # session
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15-fake"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    # identity
    def nvmlDeviceGetName(self, g: FakeGpu) -> str:
        return g.name

    def nvmlDeviceGetUUID(self, g: FakeGpu) -> str:
        return g.uuid

    def nvmlDeviceGetPciInfo(self, g: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(busId=g.bus_id)

    def nvmlDeviceGetCudaComputeCapability(self, g: FakeGpu) -> tuple[int, int]:
        return g.cc

    def nvmlDeviceGetMigMode(self, g: FakeGpu) -> list[int]:
        if g.cc < (8, 0):
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [0, 0]

    # readings
    def nvmlDeviceGetUtilizationRates(self, g: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=round(g.wave(60, 5, 98)), memory=round(g.wave(45, 2, 60)))

    def nvmlDeviceGetMemoryInfo(self, g: FakeGpu, version: int | None = None) -> SimpleNamespace:
        """v2 reports the driver's reservation apart; v1 counts it as used, as NVML does."""
        reserved = 512 * 1024 * 1024
        used = int(g.wave(300, 0.1, 0.9) * (g.total - reserved))
        free = g.total - reserved - used
        if version is None:
            return SimpleNamespace(total=g.total, used=used + reserved, free=free)
        return SimpleNamespace(total=g.total, reserved=reserved, used=used, free=free)

    def nvmlDeviceGetTemperature(self, g: FakeGpu, _sensor: int) -> int:
        return round(g.wave(120, 35, 78))

    def nvmlDeviceGetPowerUsage(self, g: FakeGpu) -> int:
        return round(g.wave(60, 0.1, 0.95) * g.limit_mw)

    def nvmlDeviceGetEnforcedPowerLimit(self, g: FakeGpu) -> int:
        return g.limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, g: FakeGpu) -> int:
        return g.limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, g: FakeGpu) -> int:
        return round((time.monotonic() - g.started) * g.limit_mw * 0.5) + 10_000_000

    def nvmlDeviceGetClockInfo(self, g: FakeGpu, clock: int) -> int:
        return {0: 1755, 1: 1755, 2: 2619}.get(clock, 1000)

    def nvmlDeviceGetPerformanceState(self, _g: FakeGpu) -> int:
        return 0

    def nvmlDeviceGetEncoderUtilization(self, _g: FakeGpu) -> list[int]:
        return [0, 167000]

    def nvmlDeviceGetDecoderUtilization(self, _g: FakeGpu) -> list[int]:
        return [0, 167000]

    def nvmlDeviceGetPcieReplayCounter(self, _g: FakeGpu) -> int:
        return 0

    def nvmlDeviceGetCurrPcieLinkGeneration(self, _g: FakeGpu) -> int:
        return 4

    def nvmlDeviceGetMaxPcieLinkGeneration(self, _g: FakeGpu) -> int:
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, _g: FakeGpu) -> int:
        return 16

    def nvmlDeviceGetMaxPcieLinkWidth(self, _g: FakeGpu) -> int:
        return 16

    def nvmlDeviceGetCurrentClocksEventReasons(self, g: FakeGpu) -> int:
        return pynvml.nvmlClocksEventReasonSwPowerCap if g.wave(60, 0, 1) > 0.9 else 0

    def nvmlDeviceGetViolationStatus(self, g: FakeGpu, policy: int) -> SimpleNamespace:
        elapsed_ns = int((time.monotonic() - g.started) * 1e9)
        return SimpleNamespace(referenceTime=elapsed_ns, violationTime=elapsed_ns // (20 + policy))

    def nvmlDeviceGetTotalEccErrors(self, _g: FakeGpu, _kind: int, _scope: int) -> int:
        return 0

    def nvmlDeviceGetRemappedRows(self, _g: FakeGpu) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)

    def nvmlDeviceGetComputeRunningProcesses(self, g: FakeGpu) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=4000 + g.index, usedGpuMemory=g.total // 2)]

    # events: XIDs never happen on simulated GPUs; the wait just times out
    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceGetSupportedEventTypes(self, _g: FakeGpu) -> int:
        return int(pynvml.nvmlEventTypeXidCriticalError)

    def nvmlDeviceRegisterEvents(self, *_args: Any) -> None: ...
    def nvmlEventSetWait(self, _event_set: object, timeout_ms: int) -> None:
        self._events.wait(timeout_ms / 1000)
        raise _err(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, _event_set: object) -> None: ...
