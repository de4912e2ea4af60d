"""The one narrow interface between the exporter and NVML.

Everything above this module sees plain Python values and four exception types, never ctypes
structures or NVML return codes. The binding is `pynvml` (from nvidia-ml-py) in production and
in the C stand-in tests; `fake.FakeBinding` implements the same function names in Python for
`--fake-gpus` and fast unit tests, so the exact same code runs on a real GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import pynvml

_LIFECYCLE = {
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    pynvml.NVML_ERROR_RESET_REQUIRED,
}
# Answers that will not change until the driver does: cache them as "not supported".
_UNSUPPORTED = {
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_PERMISSION,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
}
_LOST = {pynvml.NVML_ERROR_GPU_IS_LOST}

# NVLink throughput fields take a link id as scope; UINT_MAX asks for the sum of all links.
ALL_LINKS = 0xFFFFFFFF


class NvmlError(Exception):
    """An NVML call failed; `call` names it so errors can be counted per call."""

    def __init__(self, call: str, code: int, message: str) -> None:
        super().__init__(f"{call}: {message} (NVML code {code})")
        self.call = call
        self.code = code


class NotSupported(NvmlError):
    """The GPU or driver will never answer this call; skip it for this GPU."""


class GpuLost(NvmlError):
    """The GPU fell off the bus or needs a reset; other GPUs are unaffected."""


class Lifecycle(NvmlError):
    """The NVML session itself is gone (driver unloaded, not initialised): re-initialise."""


@dataclass(frozen=True, slots=True)
class Memory:
    """Framebuffer memory as nvidia-smi shows it: `used` excludes the driver's reservation."""

    total: int
    free: int
    used: int
    reserved: int | None  # None where only the v1 call exists (its "used" includes it)


@dataclass(frozen=True, slots=True)
class MigDevice:
    uuid: str
    gpu_instance: int
    compute_instance: int
    total: int | None
    used: int | None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _translate(call: str, exc: pynvml.NVMLError) -> NvmlError:
    code = int(exc.value)
    try:
        message = _text(str(exc))
    except Exception:  # nvmlErrorString itself can fail when the library is half-loaded
        message = "NVML error"
    if code in _UNSUPPORTED:
        return NotSupported(call, code, message)
    if code in _LOST:
        return GpuLost(call, code, message)
    if code in _LIFECYCLE:
        return Lifecycle(call, code, message)
    return NvmlError(call, code, message)


class Nvml:
    """Typed calls over a pynvml-shaped binding, with NVML errors mapped to the types above."""

    def __init__(self, binding: Any = pynvml) -> None:
        self._b = binding
        # Newer entry points the driver (library) turned out not to have: not asked again.
        self._missing: set[str] = set()

    def call(self, name: str, *args: Any) -> Any:
        fn = getattr(self._b, name, None)
        if fn is None and self._b is pynvml:
            fn = _COMPAT.get(name)
        if fn is None:
            code = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
            raise NotSupported(name, code, "not in this pynvml")
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            raise _translate(name, exc) from None

    # --- session ------------------------------------------------------------------------
    def init(self) -> None:
        self.call("nvmlInit")

    def shutdown(self) -> None:
        self.call("nvmlShutdown")

    def driver_version(self) -> str:
        return _text(self.call("nvmlSystemGetDriverVersion"))

    def cuda_version(self) -> str:
        v = int(self.call("nvmlSystemGetCudaDriverVersion"))
        return f"{v // 1000}.{(v % 1000) // 10}"

    def device_count(self) -> int:
        return int(self.call("nvmlDeviceGetCount"))

    def handle(self, index: int) -> Any:
        return self.call("nvmlDeviceGetHandleByIndex", index)

    @staticmethod
    def handle_key(handle: Any) -> int:
        """A hashable identity for a device handle, equal for the handle an event carries."""
        if isinstance(handle, int):
            return handle
        if isinstance(handle, ctypes._Pointer):
            return ctypes.cast(handle, ctypes.c_void_p).value or 0
        return id(handle)

    # --- identity -----------------------------------------------------------------------
    def name(self, h: Any) -> str:
        return _text(self.call("nvmlDeviceGetName", h))

    def uuid(self, h: Any) -> str:
        return _text(self.call("nvmlDeviceGetUUID", h))

    def pci_bus_id(self, h: Any) -> str:
        return _text(self.call("nvmlDeviceGetPciInfo", h).busId)

    def compute_capability(self, h: Any) -> str:
        major, minor = self.call("nvmlDeviceGetCudaComputeCapability", h)
        return f"{major}.{minor}"

    def mig_mode(self, h: Any) -> int:
        return int(self.call("nvmlDeviceGetMigMode", h)[0])

    # --- readings -----------------------------------------------------------------------
    def utilization(self, h: Any) -> tuple[int, int]:
        u = self.call("nvmlDeviceGetUtilizationRates", h)
        return int(u.gpu), int(u.memory)

    def memory(self, h: Any) -> Memory:
        """v2 where the driver has it: v1's "used" counts the driver-reserved memory as used,
        so it reads higher than nvidia-smi and DCGM (which use v2) by hundreds of MiB."""
        if "memory_v2" not in self._missing:
            try:
                m = self.call("nvmlDeviceGetMemoryInfo", h, pynvml.nvmlMemory_v2)
                return Memory(int(m.total), int(m.free), int(m.used), int(m.reserved))
            except NotSupported as exc:
                self._note_missing("memory_v2", exc)
        m = self.call("nvmlDeviceGetMemoryInfo", h)
        return Memory(int(m.total), int(m.free), int(m.used), None)

    def _note_missing(self, what: str, exc: NvmlError) -> None:
        if exc.code == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
            self._missing.add(what)

    def temperature(self, h: Any) -> int:
        """nvmlDeviceGetTemperatureV where pynvml and the driver have it; the older call,
        marked for removal in CUDA 14, only as a fallback for older drivers and bindings."""
        if "temperature_v" not in self._missing:
            try:
                return int(self.call("nvmlDeviceGetTemperatureV", h, pynvml.NVML_TEMPERATURE_GPU))
            except NotSupported as exc:
                self._note_missing("temperature_v", exc)
        return int(self.call("nvmlDeviceGetTemperature", h, pynvml.NVML_TEMPERATURE_GPU))

    def retired_pages(self, h: Any, cause: int) -> int:
        return len(self.call("nvmlDeviceGetRetiredPages", h, cause))

    def uint(self, name: str, h: Any, *args: Any) -> int:
        """Any NVML getter that answers one integer (temperature, power, clocks, ...)."""
        return int(self.call(name, h, *args))

    def codec_utilization(self, name: str, h: Any) -> int:
        return int(self.call(name, h)[0])

    def violation_ns(self, h: Any, policy: int) -> int:
        return int(self.call("nvmlDeviceGetViolationStatus", h, policy).violationTime)

    def remapped_rows(self, h: Any) -> tuple[int, int, int, int]:
        corr, unc, pending, failure = self.call("nvmlDeviceGetRemappedRows", h)
        return int(corr), int(unc), int(pending), int(failure)

    def field_values(self, h: Any, fields: list[tuple[int, int]]) -> dict[int, float | None]:
        """One batched call; a field the GPU lacks comes back as None, not as an error."""
        out: dict[int, float | None] = {}
        for v in self.call("nvmlDeviceGetFieldValues", h, fields):
            if int(v.nvmlReturn) != pynvml.NVML_SUCCESS:
                out[int(v.fieldId)] = None
                continue
            out[int(v.fieldId)] = _field_number(int(v.valueType), v.value)
        return out

    def processes(self, h: Any) -> list[tuple[int, int | None]]:
        procs = self.call("nvmlDeviceGetComputeRunningProcesses", h)
        return [(int(p.pid), p.usedGpuMemory) for p in procs]

    def mig_devices(self, h: Any) -> list[MigDevice]:
        """The GPU's MIG instances (empty slots skipped), memory from the v1 call, which a MIG
        device answers without a driver reservation of its own."""
        out: list[MigDevice] = []
        for i in range(int(self.call("nvmlDeviceGetMaxMigDeviceCount", h))):
            try:
                mh = self.call("nvmlDeviceGetMigDeviceHandleByIndex", h, i)
            except NvmlError as exc:
                if exc.code == pynvml.NVML_ERROR_NOT_FOUND:
                    continue  # an empty MIG slot
                raise
            try:
                m = self.call("nvmlDeviceGetMemoryInfo", mh)
                mem: Memory | None = Memory(int(m.total), int(m.free), int(m.used), None)
            except NotSupported:
                mem = None
            out.append(
                MigDevice(
                    uuid=self.uuid(mh),
                    gpu_instance=int(self.call("nvmlDeviceGetGpuInstanceId", mh)),
                    compute_instance=int(self.call("nvmlDeviceGetComputeInstanceId", mh)),
                    total=mem.total if mem else None,
                    used=mem.used if mem else None,
                )
            )
        return out

    # --- GPM (Hopper and later) ---------------------------------------------------------
    def gpm_supported(self, h: Any) -> bool:
        return bool(self.call("nvmlGpmQueryDeviceSupport", h).isSupportedDevice)

    def gpm_sample_alloc(self) -> Any:
        return self.call("nvmlGpmSampleAlloc")

    def gpm_sample_get(self, h: Any, sample: Any) -> None:
        self.call("nvmlGpmSampleGet", h, sample)

    def gpm_mig_sample_get(self, h: Any, gpu_instance: int, sample: Any) -> None:
        self.call("nvmlGpmMigSampleGet", h, gpu_instance, sample)

    def gpm_sample_free(self, sample: Any) -> None:
        self.call("nvmlGpmSampleFree", sample)

    def gpm_metrics(self, first: Any, second: Any, ids: list[int]) -> dict[int, float]:
        req = pynvml.c_nvmlGpmMetricsGet_t()
        req.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(ids)
        req.sample1 = first
        req.sample2 = second
        for i, metric_id in enumerate(ids):
            req.metrics[i].metricId = metric_id
        self.call("nvmlGpmMetricsGet", req)
        return {
            int(req.metrics[i].metricId): float(req.metrics[i].value)
            for i in range(len(ids))
            if int(req.metrics[i].nvmlReturn) == pynvml.NVML_SUCCESS
        }

    # --- events -------------------------------------------------------------------------
    def event_set(self) -> Any:
        return self.call("nvmlEventSetCreate")

    def register_xid(self, h: Any, event_set: Any) -> bool:
        supported = int(self.call("nvmlDeviceGetSupportedEventTypes", h))
        if not supported & pynvml.nvmlEventTypeXidCriticalError:
            return False
        self.call("nvmlDeviceRegisterEvents", h, pynvml.nvmlEventTypeXidCriticalError, event_set)
        return True

    def wait_event(self, event_set: Any, timeout_ms: int) -> tuple[int, int, int] | None:
        """(handle key, event type, event data), or None when the wait timed out."""
        try:
            data = self.call("nvmlEventSetWait", event_set, timeout_ms)
        except NvmlError as exc:
            if exc.code == pynvml.NVML_ERROR_TIMEOUT:
                return None
            raise
        return self.handle_key(data.device), int(data.eventType), int(data.eventData)

    def event_set_free(self, event_set: Any) -> None:
        self.call("nvmlEventSetFree", event_set)


class _TemperatureV1(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("sensorType", ctypes.c_int),
        ("temperature", ctypes.c_int),
    ]


def _temperature_v(handle: Any, sensor: int) -> int:
    """nvmlDeviceGetTemperatureV for pynvml releases without its wrapper (before 12.570): the
    driver may have it, and may one day lack the older call, whatever pynvml is installed."""
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetTemperatureV")
    reading = _TemperatureV1(version=0x100000C, sensorType=sensor)  # nvmlTemperature_v1
    pynvml._nvmlCheckReturn(fn(handle, ctypes.byref(reading)))
    return int(reading.temperature)


# Entry points newer than the oldest pynvml the exporter supports, called through pynvml's
# own library handle when that pynvml lacks the wrapper.
_COMPAT: dict[str, Any] = {"nvmlDeviceGetTemperatureV": _temperature_v}

_VALUE_ATTR = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


def _field_number(value_type: int, value: Any) -> float | None:
    attr = _VALUE_ATTR.get(value_type)
    return None if attr is None else float(getattr(value, attr))
