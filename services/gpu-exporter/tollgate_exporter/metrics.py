"""Every metric the exporter can emit, named and described exactly once.

The collector refuses a sample whose name is not declared here, so a typo fails a test instead
of silently shipping a new series; the docs table is checked against this list too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric family: its exposition name, Prometheus type and help text."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str


GAUGE = "gauge"
COUNTER = "counter"

_SPECS: tuple[Spec, ...] = (
    # --- the original exporter's five, names kept exactly -------------------------------
    Spec(
        "gpu_utilization_percent",
        GAUGE,
        "Time one or more kernels ran on the GPU over NVML's last sample period, percent"
        " (kernel-active time, not SM occupancy: see gpu_gpm_sm_active_ratio).",
    ),
    Spec("gpu_memory_used_gb", GAUGE, "Framebuffer memory used, GiB (legacy name)."),
    Spec("gpu_memory_free_gb", GAUGE, "Framebuffer memory free, GiB (legacy name)."),
    Spec("gpu_temperature_celsius", GAUGE, "GPU core temperature, degrees Celsius."),
    Spec("gpu_power_watts", GAUGE, "Board power draw, watts."),
    # --- identity -----------------------------------------------------------------------
    Spec(
        "gpu_info",
        GAUGE,
        "Always 1; labels carry driver, CUDA, compute capability and MIG mode.",
    ),
    Spec("gpu_lost", GAUGE, "1 when NVML reports the GPU lost (fell off the bus), else 0."),
    # --- memory -------------------------------------------------------------------------
    Spec("gpu_memory_total_bytes", GAUGE, "Framebuffer memory total, bytes."),
    Spec("gpu_memory_used_bytes", GAUGE, "Framebuffer memory used, bytes."),
    Spec("gpu_memory_free_bytes", GAUGE, "Framebuffer memory free, bytes."),
    Spec("gpu_memory_reserved_bytes", GAUGE, "Framebuffer memory reserved by the driver, bytes."),
    Spec("gpu_memory_temperature_celsius", GAUGE, "HBM/GDDR memory temperature, Celsius."),
    # --- utilization --------------------------------------------------------------------
    Spec(
        "gpu_memory_copy_utilization_percent",
        GAUGE,
        "Time the memory controller was busy (memory-copy utilization), percent.",
    ),
    Spec("gpu_encoder_utilization_percent", GAUGE, "Video encoder utilization, percent."),
    Spec("gpu_decoder_utilization_percent", GAUGE, "Video decoder utilization, percent."),
    Spec(
        "gpu_gpm_graphics_active_ratio",
        GAUGE,
        "GPM: fraction of time the graphics/compute engine was active (Hopper+), 0-1.",
    ),
    Spec("gpu_gpm_sm_active_ratio", GAUGE, "GPM: fraction of SMs busy (Hopper+), 0-1."),
    Spec("gpu_gpm_sm_occupancy_ratio", GAUGE, "GPM: warps resident vs maximum (Hopper+), 0-1."),
    Spec(
        "gpu_gpm_tensor_active_ratio",
        GAUGE,
        "GPM: fraction of time any tensor pipe was active (Hopper+), 0-1.",
    ),
    Spec("gpu_gpm_dram_active_ratio", GAUGE, "GPM: DRAM bandwidth used vs peak (Hopper+), 0-1."),
    Spec(
        "gpu_gpm_pcie_transmit_bytes_per_second",
        GAUGE,
        "GPM: PCIe traffic from the GPU over the last collect window, bytes per second.",
    ),
    Spec(
        "gpu_gpm_pcie_receive_bytes_per_second",
        GAUGE,
        "GPM: PCIe traffic to the GPU over the last collect window, bytes per second.",
    ),
    # --- clocks and power ---------------------------------------------------------------
    Spec("gpu_sm_clock_hertz", GAUGE, "Current SM clock, hertz."),
    Spec("gpu_memory_clock_hertz", GAUGE, "Current memory clock, hertz."),
    Spec("gpu_graphics_clock_hertz", GAUGE, "Current graphics clock, hertz."),
    Spec("gpu_energy_joules_total", COUNTER, "Energy consumed since the driver loaded, joules."),
    Spec("gpu_power_limit_watts", GAUGE, "Enforced power limit, watts."),
    Spec("gpu_power_default_limit_watts", GAUGE, "Default power management limit, watts."),
    Spec("gpu_fan_speed_percent", GAUGE, "Fan speed as a percent of maximum."),
    Spec("gpu_performance_state", GAUGE, "Performance state, 0 (P0, fastest) to 15."),
    Spec(
        "gpu_clock_event_active",
        GAUGE,
        "1 while the named clock-event (throttle) reason holds clocks down, else 0.",
    ),
    Spec(
        "gpu_clock_event_violation_seconds_total",
        COUNTER,
        "Time clocks were held below target by the named policy, seconds.",
    ),
    # --- PCIe and NVLink ----------------------------------------------------------------
    Spec("gpu_pcie_replay_total", COUNTER, "PCIe replay counter (link-level retries)."),
    Spec("gpu_pcie_link_generation", GAUGE, "Current PCIe link generation."),
    Spec("gpu_pcie_link_width", GAUGE, "Current PCIe link width, lanes."),
    Spec("gpu_pcie_link_generation_max", GAUGE, "Maximum PCIe link generation."),
    Spec("gpu_pcie_link_width_max", GAUGE, "Maximum PCIe link width, lanes."),
    Spec("gpu_nvlink_transmit_bytes_total", COUNTER, "NVLink data transmitted, all links, bytes."),
    Spec("gpu_nvlink_receive_bytes_total", COUNTER, "NVLink data received, all links, bytes."),
    Spec(
        "gpu_nvlink_errors_total",
        COUNTER,
        "NVLink errors, all links, by type (crc_flit, crc_data, replay, recovery).",
    ),
    # --- reliability ----------------------------------------------------------------------
    Spec(
        "gpu_xid_errors_total",
        COUNTER,
        "XID critical errors seen by the NVML event thread since the exporter started.",
    ),
    Spec(
        "gpu_ecc_errors_total",
        COUNTER,
        "ECC errors by type (corrected/uncorrected) and scope (volatile/aggregate).",
    ),
    Spec("gpu_remapped_rows", GAUGE, "Memory rows remapped, by type (correctable/uncorrectable)."),
    Spec("gpu_row_remap_pending", GAUGE, "1 when a row remap is pending (needs a GPU reset)."),
    Spec("gpu_row_remap_failure", GAUGE, "1 when a row remap has failed."),
    Spec("gpu_retired_pages", GAUGE, "Memory pages retired (pre-Ampere GPUs), by cause."),
    Spec("gpu_retired_pages_pending", GAUGE, "1 when a page retirement waits for a reboot."),
    # --- MIG, processes, pods -----------------------------------------------------------
    Spec("gpu_mig_memory_total_bytes", GAUGE, "MIG instance memory total, bytes."),
    Spec("gpu_mig_memory_used_bytes", GAUGE, "MIG instance memory used, bytes."),
    *(
        Spec(f"gpu_mig_gpm_{suffix}", GAUGE, f"GPM per MIG GPU instance: {what}, 0-1.")
        for suffix, what in (
            ("graphics_active_ratio", "graphics/compute engine active"),
            ("sm_active_ratio", "fraction of the instance's SMs busy"),
            ("sm_occupancy_ratio", "warps resident vs maximum"),
            ("tensor_active_ratio", "any tensor pipe active"),
            ("dram_active_ratio", "DRAM bandwidth used vs peak"),
        )
    ),
    Spec(
        "gpu_process_memory_used_bytes",
        GAUGE,
        "GPU memory used by a compute process, bytes; pod labels where one container holds"
        " the GPU, pod_uid/container_id from the pid's cgroup where readable (hostPID).",
    ),
    Spec(
        "gpu_allocation_info",
        GAUGE,
        "Always 1: the GPU (or MIG instance) is allocated to this pod/container by the kubelet.",
    ),
    # --- the exporter itself ------------------------------------------------------------
    Spec("gpu_exporter_nvml_up", GAUGE, "1 when NVML is initialised and answering, else 0."),
    Spec("gpu_exporter_gpus", GAUGE, "GPUs NVML reported at the last (re)initialisation."),
    Spec(
        "gpu_exporter_nvml_session_stuck",
        GAUGE,
        "1 while an NVML initialisation or discovery call has not returned for too long.",
    ),
    Spec(
        "gpu_exporter_gpu_stale",
        GAUGE,
        "1 while the GPU's readings are withheld: its last NVML call hangs or it has not"
        " collected recently; its other series are absent meanwhile.",
    ),
    Spec(
        "gpu_exporter_gpu_last_collect_timestamp_seconds",
        GAUGE,
        "Unix time this GPU's readings were last collected successfully.",
    ),
    Spec(
        "gpu_exporter_gpu_collect_duration_seconds",
        GAUGE,
        "Duration of the GPU's last completed round of NVML calls.",
    ),
    Spec(
        "gpu_exporter_collect_duration_seconds",
        GAUGE,
        "Duration of the last snapshot: gathering every GPU's readings and rendering.",
    ),
    Spec(
        "gpu_exporter_last_collect_timestamp_seconds",
        GAUGE,
        "Unix time the last collect finished.",
    ),
    Spec("gpu_exporter_collects_total", COUNTER, "Collects run since start."),
    Spec("gpu_exporter_nvml_errors_total", COUNTER, "NVML call failures by call."),
    Spec("gpu_exporter_nvml_inits_total", COUNTER, "NVML initialisations attempted, by result."),
    Spec(
        "gpu_exporter_unsupported_metric",
        GAUGE,
        "1 for each (GPU, probe) NVML answered NOT_SUPPORTED; it is retried every 25"
        " collects or 30 s, whichever comes first.",
    ),
    Spec(
        "gpu_exporter_failing_metric",
        GAUGE,
        "1 for each (GPU, probe) whose last call failed with an error other than"
        " NOT_SUPPORTED; retried every collect.",
    ),
    Spec(
        "gpu_exporter_podresources_up",
        GAUGE,
        "1 when the last kubelet pod-resources List succeeded, else 0.",
    ),
    Spec(
        "gpu_exporter_podresources_errors_total",
        COUNTER,
        "Failed kubelet pod-resources List calls.",
    ),
    Spec(
        "gpu_exporter_podresources_duration_seconds",
        GAUGE,
        "Duration of the last kubelet pod-resources List call.",
    ),
)

SPECS: dict[str, Spec] = {s.name: s for s in _SPECS}
ORDER: dict[str, int] = {s.name: i for i, s in enumerate(_SPECS)}

GIB = float(1 << 30)
