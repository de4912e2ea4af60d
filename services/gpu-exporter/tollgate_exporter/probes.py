"""Per-GPU probes: one NVML reading each, turned into samples in Prometheus base units.

A probe is the unit of failure. When NVML answers NOT_SUPPORTED the GPU's worker skips that
probe for a while and retries it (MIG switched off, a driver update: answers change), saying
so in `gpu_exporter_unsupported_metric`; any other failure costs only that probe's samples for
this collect, never the scrape. Stateful probes (GPM) have a `close` that frees what NVML lent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pynvml

from .metrics import GIB
from .nvml import ALL_LINKS, NotSupported, Nvml, NvmlError
from .procinfo import cgroup_labels

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

NVLINK_ERROR_FIELDS: tuple[tuple[str, int], ...] = (
    ("crc_flit", pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL),
    ("crc_data", pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL),
    ("replay", pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL),
    ("recovery", pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL),
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
    if m.reserved is not None:
        yield "gpu_memory_reserved_bytes", NO_LABELS, m.reserved


def temperature(nv: Nvml, h: Any) -> Iterator[Sample]:
    yield "gpu_temperature_celsius", NO_LABELS, nv.temperature(h)


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


def retired_pages(nv: Nvml, h: Any) -> Iterator[Sample]:
    """Page retirement (before Ampere; later GPUs remap rows instead and answer
    NOT_SUPPORTED here)."""
    for cause, cause_id in (
        ("single_bit_ecc", pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
        ("double_bit_ecc", pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
    ):
        yield "gpu_retired_pages", {"cause": cause}, nv.retired_pages(h, cause_id)
    pending = nv.uint("nvmlDeviceGetRetiredPagesPendingStatus", h)
    yield "gpu_retired_pages_pending", NO_LABELS, 1 if pending else 0


def nvlink_errors(nv: Nvml, h: Any) -> Iterator[Sample]:
    """The four NVLink error counters (all links) in one batched field call."""
    values = nv.field_values(h, [(fid, 0) for _, fid in NVLINK_ERROR_FIELDS])
    if all(values.get(fid) is None for _, fid in NVLINK_ERROR_FIELDS):
        raise NotSupported("nvlink_errors", pynvml.NVML_ERROR_NOT_SUPPORTED, "no NVLink")
    for kind, fid in NVLINK_ERROR_FIELDS:
        value = values.get(fid)
        if value is not None:
            yield "gpu_nvlink_errors_total", {"type": kind}, value


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
    """Per-process memory; with hostPID, the pod UID and container ID from the pid's cgroup."""
    for pid, used in nv.processes(h):
        if used is not None:
            yield "gpu_process_memory_used_bytes", {"pid": str(pid), **cgroup_labels(pid)}, used


GPM_METRICS: tuple[tuple[int, str, float], ...] = (
    # metric id, family suffix, scale to the base unit (percent -> ratio, MiB/s -> bytes/s)
    (pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, "graphics_active_ratio", 0.01),
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "sm_active_ratio", 0.01),
    (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "sm_occupancy_ratio", 0.01),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "tensor_active_ratio", 0.01),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "dram_active_ratio", 0.01),
    (pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, "pcie_transmit_bytes_per_second", 1 << 20),
    (pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC, "pcie_receive_bytes_per_second", 1 << 20),
)
GPM_MIN_WINDOW = 0.1  # NVML refuses a metric over two samples less than 100 ms apart


class GpmPair:
    """Two NVML GPM samples, alternated, for one GPU or one MIG GPU instance.

    A window shorter than NVML's 100 ms minimum is never asked for: an early collect serves
    the previous values instead. The samples are NVML's memory: `close` gives them back.
    """

    def __init__(self, nv: Nvml) -> None:
        self._prev = nv.gpm_sample_alloc()
        try:
            self._cur = nv.gpm_sample_alloc()
        except Exception:
            nv.gpm_sample_free(self._prev)
            raise
        self._taken = 0.0
        self._values: dict[int, float] = {}

    def read(self, nv: Nvml, take: Callable[[Any], None], ids: list[int]) -> dict[int, float]:
        now = time.monotonic()
        if self._taken and now - self._taken < GPM_MIN_WINDOW:
            return self._values
        if not self._taken:  # the baseline: no window yet
            take(self._prev)
            self._taken = now
            return {}
        take(self._cur)
        self._values = nv.gpm_metrics(self._prev, self._cur, ids)
        self._prev, self._cur = self._cur, self._prev
        self._taken = now
        return self._values

    def close(self, nv: Nvml) -> None:
        for sample in (self._prev, self._cur):
            with contextlib.suppress(NvmlError):
                nv.gpm_sample_free(sample)


def _gpm_samples(prefix: str, values: dict[int, float], labels: dict[str, str]) -> Iterator[Sample]:
    for metric_id, suffix, scale in GPM_METRICS:
        if metric_id in values:
            yield f"{prefix}{suffix}", labels, values[metric_id] * scale


class Gpm:
    """Hopper+ GPU Performance Monitoring: ratios between two samples one collect apart.

    Stateful, so each GPU's worker makes its own. The first collect only takes the baseline.
    """

    IDS = [mid for mid, _, _ in GPM_METRICS]

    def __init__(self) -> None:
        self._pair: GpmPair | None = None

    def __call__(self, nv: Nvml, h: Any) -> Iterator[Sample]:
        if self._pair is None:
            if not nv.gpm_supported(h):
                raise NotSupported("nvmlGpmQueryDeviceSupport", 3, "GPM not supported")
            self._pair = GpmPair(nv)
        values = self._pair.read(nv, lambda s: nv.gpm_sample_get(h, s), self.IDS)
        yield from _gpm_samples("gpu_gpm_", values, NO_LABELS)

    def close(self, nv: Nvml) -> None:
        if self._pair is not None:
            self._pair.close(nv)
            self._pair = None


class Mig:
    """MIG instances: memory per instance and, where GPM exists, utilization per GPU instance
    (nvmlGpmMigSampleGet). Pairs of GPM samples follow the instances as they come and go."""

    IDS = Gpm.IDS[:5]  # PCIe traffic is per GPU, not per instance

    def __init__(self) -> None:
        self._pairs: dict[int, GpmPair] = {}
        self._gpm: bool | None = None

    def __call__(self, nv: Nvml, h: Any) -> Iterator[Sample]:
        if nv.mig_mode(h) != pynvml.NVML_DEVICE_MIG_ENABLE:
            self.close(nv)
            return
        devices = nv.mig_devices(h)
        if self._gpm is None:
            try:
                self._gpm = nv.gpm_supported(h)
            except NotSupported:
                self._gpm = False
        seen: set[int] = set()
        for dev in devices:
            labels = {
                "mig_uuid": dev.uuid,
                "gpu_instance": str(dev.gpu_instance),
                "compute_instance": str(dev.compute_instance),
            }
            if dev.total is not None:
                yield "gpu_mig_memory_total_bytes", labels, dev.total
            if dev.used is not None:
                yield "gpu_mig_memory_used_bytes", labels, dev.used
            if not self._gpm or dev.gpu_instance in seen:
                continue  # GPM samples a GPU instance: its first compute instance carries it
            seen.add(dev.gpu_instance)
            yield from self._instance_gpm(nv, h, dev.gpu_instance, labels)
        for gi in set(self._pairs) - seen:
            self._pairs.pop(gi).close(nv)

    def _instance_gpm(self, nv: Nvml, h: Any, gi: int, labels: dict[str, str]) -> Iterator[Sample]:
        pair = self._pairs.get(gi)
        if pair is None:
            pair = self._pairs[gi] = GpmPair(nv)
        try:
            values = pair.read(nv, lambda s: nv.gpm_mig_sample_get(h, gi, s), self.IDS)
        except NotSupported:
            self._gpm = False  # MIG memory stays; per-instance GPM is retried with the GPU's
            self.close(nv)
            return
        yield from _gpm_samples("gpu_mig_gpm_", values, labels)

    def close(self, nv: Nvml) -> None:
        for pair in self._pairs.values():
            pair.close(nv)
        self._pairs.clear()


def make_probes() -> list[tuple[str, Probe]]:
    """A fresh probe list for one GPU: the stateless probes plus its own stateful ones."""
    return [*PROBES, ("gpm", Gpm()), ("mig", Mig())]


PROBES: tuple[tuple[str, Probe], ...] = (
    ("utilization", utilization),
    ("memory", memory),
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
    ("retired_pages", retired_pages),
    ("nvlink_errors", nvlink_errors),
    *((key, _field(fid, scope, metric, scale)) for key, fid, scope, metric, scale in FIELD_METRICS),
    ("processes", processes),
)
