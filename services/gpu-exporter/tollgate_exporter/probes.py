"""Per-GPU probes: one NVML reading each, turned into samples in Prometheus base units.

A probe is the unit of failure. When NVML answers NOT_SUPPORTED the collector drops that probe
for that GPU for good (and says so in `gpu_exporter_unsupported_metric`); any other failure
costs only that probe's samples for this collect, never the scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pynvml

from .metrics import GIB
from .nvml import ALL_LINKS, NotSupported, Nvml

Sample = tuple[str, dict[str, str], float]
Probe = Callable[[Nvml, Any], Iterator[Sample]]

NO_LABELS: dict[str, str] = {}
MHZ = 1_000_000.0

CLOCK_EVENT_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", pynvml.nvmlClocksEventReasonGpuIdle),
    ("applications_clocks_setting", pynvml.nvmlClocksEventReasonApplicationsClocksSetting),
    ("sw_power_cap", pynvml.nvmlClocksEventReasonSwPowerCap),
    ("hw_slowdown", pynvml.nvmlClocksEventReasonHwSlowdown),
    ("sync_boost", pynvml.nvmlClocksEventReasonSyncBoost),
    ("sw_thermal_slowdown", pynvml.nvmlClocksEventReasonSwThermalSlowdown),
    ("hw_thermal_slowdown", pynvml.nvmlClocksEventReasonHwThermalSlowdown),
    ("hw_power_brake_slowdown", pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown),
    ("display_clock_setting", pynvml.nvmlClocksEventReasonDisplayClockSetting),
)

VIOLATION_POLICIES: tuple[tuple[str, int], ...] = (
    ("power", pynvml.NVML_PERF_POLICY_POWER),
    ("thermal", pynvml.NVML_PERF_POLICY_THERMAL),
    ("sync_boost", pynvml.NVML_PERF_POLICY_SYNC_BOOST),
    ("board_limit", pynvml.NVML_PERF_POLICY_BOARD_LIMIT),
    ("low_utilization", pynvml.NVML_PERF_POLICY_LOW_UTILIZATION),
    ("reliability", pynvml.NVML_PERF_POLICY_RELIABILITY),
)

FIELD_METRICS: tuple[tuple[str, int, int, str, float], ...] = (
    # probe key, field id, scope, metric, scale to the base unit
    ("memory_temperature", pynvml.NVML_FI_DEV_MEMORY_TEMP, 0, "gpu_memory_temperature_celsius", 1),
    (
        "nvlink_tx",
        pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
        ALL_LINKS,
        "gpu_nvlink_transmit_bytes_total",
        1024,
    ),
    (
        "nvlink_rx",
        pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
        ALL_LINKS,
        "gpu_nvlink_receive_bytes_total",
        1024,
    ),
)


def utilization(nv: Nvml, h: Any) -> Iterator[Sample]:
    gpu, mem = nv.utilization(h)
    yield "gpu_utilization_percent", NO_LABELS, gpu
    yield "gpu_memory_copy_utilization_percent", NO_LABELS, mem


def memory(nv: Nvml, h: Any) -> Iterator[Sample]:
    m = nv.memory(h)
    yield "gpu_memory_used_gb", NO_LABELS, m.used / GIB
    yield "gpu_memory_free_gb", NO_LABELS, m.free / GIB
    yield "gpu_memory_total_bytes", NO_LABELS, m.total
    yield "gpu_memory_used_bytes", NO_LABELS, m.used
    yield "gpu_memory_free_bytes", NO_LABELS, m.free


def memory_reserved(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_memory_reserved_bytes", NO_LABELS, nv.memory_reserved(h)


def temperature(nv: Nvml, h: Any) -> Iterator[Sample]:
    t = nv.uint("nvmlDeviceGetTemperature", h, pynvml.NVML_TEMPERATURE_GPU)
    yield "gpu_temperature_celsius", NO_LABELS, t


def power(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_power_watts", NO_LABELS, nv.uint("nvmlDeviceGetPowerUsage", h) / 1000.0


def power_limit(nv: Nvml, h: Any) -> Iterator[Sample]:
    mw = nv.uint("nvmlDeviceGetEnforcedPowerLimit", h)
    yield "gpu_power_limit_watts", NO_LABELS, mw / 1000.0


def power_default_limit(nv: Nvml, h: Any) -> Iterator[Sample]:
    mw = nv.uint("nvmlDeviceGetPowerManagementDefaultLimit", h)
    yield "gpu_power_default_limit_watts", NO_LABELS, mw / 1000.0


def energy(nv: Nvml, h: Any) -> Iterator[Sample]:
    mj = nv.uint("nvmlDeviceGetTotalEnergyConsumption", h)
    yield "gpu_energy_joules_total", NO_LABELS, mj / 1000.0


def clocks(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_sm_clock_hertz", NO_LABELS, nv.uint("nvmlDeviceGetClockInfo", h, 1) * MHZ
    yield "gpu_memory_clock_hertz", NO_LABELS, nv.uint("nvmlDeviceGetClockInfo", h, 2) * MHZ
    yield "gpu_graphics_clock_hertz", NO_LABELS, nv.uint("nvmlDeviceGetClockInfo", h, 0) * MHZ


def fan(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_fan_speed_percent", NO_LABELS, nv.uint("nvmlDeviceGetFanSpeed", h)


def pstate(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_performance_state", NO_LABELS, nv.uint("nvmlDeviceGetPerformanceState", h)


def encoder(nv: Nvml, h: Any) -> Iterator[Sample]:
    util = nv.codec_utilization("nvmlDeviceGetEncoderUtilization", h)
    yield "gpu_encoder_utilization_percent", NO_LABELS, util


def decoder(nv: Nvml, h: Any) -> Iterator[Sample]:
    util = nv.codec_utilization("nvmlDeviceGetDecoderUtilization", h)
    yield "gpu_decoder_utilization_percent", NO_LABELS, util


def pcie_replay(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_pcie_replay_total", NO_LABELS, nv.uint("nvmlDeviceGetPcieReplayCounter", h)


def pcie_link(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_pcie_link_generation", NO_LABELS, nv.uint("nvmlDeviceGetCurrPcieLinkGeneration", h)
    yield "gpu_pcie_link_width", NO_LABELS, nv.uint("nvmlDeviceGetCurrPcieLinkWidth", h)


def pcie_link_max(nv: Nvml, h: Any) -> Iterator[Sample]:
    gen = nv.uint("nvmlDeviceGetMaxPcieLinkGeneration", h)
    yield "gpu_pcie_link_generation_max", NO_LABELS, gen
    yield "gpu_pcie_link_width_max", NO_LABELS, nv.uint("nvmlDeviceGetMaxPcieLinkWidth", h)


def clock_events(nv: Nvml, h: Any) -> Iterator[Sample]:
    mask = nv.uint("nvmlDeviceGetCurrentClocksEventReasons", h)
    for reason, bit in CLOCK_EVENT_REASONS:
        yield "gpu_clock_event_active", {"reason": reason}, 1 if mask & bit else 0


def _violation(policy_name: str, policy: int) -> Probe:
    def probe(nv: Nvml, h: Any) -> Iterator[Sample]:
        seconds = nv.violation_ns(h, policy) / 1e9
        yield "gpu_clock_event_violation_seconds_total", {"policy": policy_name}, seconds

    return probe


def _ecc(error_type: str, type_id: int, scope: str, scope_id: int) -> Probe:
    def probe(nv: Nvml, h: Any) -> Iterator[Sample]:
        count = nv.uint("nvmlDeviceGetTotalEccErrors", h, type_id, scope_id)
        yield "gpu_ecc_errors_total", {"type": error_type, "scope": scope}, count

    return probe


def remapped_rows(nv: Nvml, h: Any) -> Iterator[Sample]:
    corr, unc, pending, failure = nv.remapped_rows(h)
    yield "gpu_remapped_rows", {"type": "correctable"}, corr
    yield "gpu_remapped_rows", {"type": "uncorrectable"}, unc
    yield "gpu_row_remap_pending", NO_LABELS, 1 if pending else 0
    yield "gpu_row_remap_failure", NO_LABELS, 1 if failure else 0


def _field(field_id: int, scope: int, metric: str, scale: float) -> Probe:
    """One field per call, so a GPU without NVLink negative-caches only the NVLink fields."""

    def probe(nv: Nvml, h: Any) -> Iterator[Sample]:
        value = nv.field_values(h, [(field_id, scope)]).get(field_id)
        if value is None:
            raise NotSupported(f"field:{field_id}", pynvml.NVML_ERROR_NOT_SUPPORTED, "no field")
        yield metric, NO_LABELS, value * scale

    return probe


def processes(nv: Nvml, h: Any) -> Iterator[Sample]:
    for pid, used in nv.processes(h):
        if used is not None:
            yield "gpu_process_memory_used_bytes", {"pid": str(pid)}, used


def mig(nv: Nvml, h: Any) -> Iterator[Sample]:
    if nv.mig_mode(h) != pynvml.NVML_DEVICE_MIG_ENABLE:
        return
    for dev in nv.mig_devices(h):
        labels = {
            "mig_uuid": dev.uuid,
            "gpu_instance": str(dev.gpu_instance),
            "compute_instance": str(dev.compute_instance),
        }
        if dev.total is not None:
            yield "gpu_mig_memory_total_bytes", labels, dev.total
        if dev.used is not None:
            yield "gpu_mig_memory_used_bytes", labels, dev.used


class Gpm:
    """Hopper+ GPU Performance Monitoring: ratios between two samples taken one collect apart.

    Stateful, so the collector makes one per GPU. The first collect only takes the baseline.
    """

    METRICS: tuple[tuple[int, str], ...] = (
        (pynvml.NVML_GPM_METRIC_SM_UTIL, "gpu_gpm_sm_active_ratio"),
        (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "gpu_gpm_sm_occupancy_ratio"),
        (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "gpu_gpm_tensor_active_ratio"),
        (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "gpu_gpm_dram_active_ratio"),
    )

    def __init__(self) -> None:
        self._prev: Any = None
        self._cur: Any = None

    def __call__(self, nv: Nvml, h: Any) -> Iterator[Sample]:
        if self._prev is None:
            if not nv.gpm_supported(h):
                raise NotSupported("nvmlGpmQueryDeviceSupport", 3, "GPM not supported")
            self._prev, self._cur = nv.gpm_sample_alloc(), nv.gpm_sample_alloc()
            nv.gpm_sample_get(h, self._prev)
            return
        nv.gpm_sample_get(h, self._cur)
        values = nv.gpm_metrics(self._prev, self._cur, [mid for mid, _ in self.METRICS])
        self._prev, self._cur = self._cur, self._prev
        for metric_id, name in self.METRICS:
            if metric_id in values:
                yield name, NO_LABELS, values[metric_id] / 100.0


PROBES: tuple[tuple[str, Probe], ...] = (
    ("utilization", utilization),
    ("memory", memory),
    ("memory_reserved", memory_reserved),
    ("temperature", temperature),
    ("power", power),
    ("power_limit", power_limit),
    ("power_default_limit", power_default_limit),
    ("energy", energy),
    ("clocks", clocks),
    ("fan", fan),
    ("performance_state", pstate),
    ("encoder", encoder),
    ("decoder", decoder),
    ("pcie_replay", pcie_replay),
    ("pcie_link", pcie_link),
    ("pcie_link_max", pcie_link_max),
    ("clock_events", clock_events),
    *((f"violation_{name}", _violation(name, pid)) for name, pid in VIOLATION_POLICIES),
    *(
        (f"ecc_{t}_{s}", _ecc(t, tid, s, sid))
        for t, tid in (
            ("corrected", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("uncorrected", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        )
        for s, sid in (
            ("volatile", pynvml.NVML_VOLATILE_ECC),
            ("aggregate", pynvml.NVML_AGGREGATE_ECC),
        )
    ),
    ("remapped_rows", remapped_rows),
    *((key, _field(fid, scope, metric, scale)) for key, fid, scope, metric, scale in FIELD_METRICS),
    ("processes", processes),
    ("mig", mig),
)
