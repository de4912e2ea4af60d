"""A dcgm-exporter-compatible rendering of the same readings (`--format dcgm|both`).

Users moving from dcgm-exporter keep NVIDIA's Grafana dashboard, their alerts and their
prometheus-adapter HPA rules on `DCGM_FI_DEV_GPU_UTIL{namespace,pod}`: the names, units
(MiB, MHz, mJ, microseconds) and labels (`gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`,
`Hostname`, `DCGM_FI_DRIVER_VERSION`, `GPU_I_ID`, and `namespace`/`pod`/`container` from the
kubelet) are dcgm-exporter's. As there, pod labels go on every series of the GPU, counters
included, and a GPU shared by several pods gets one series per pod. The exporter's own
`gpu_exporter_*` self-metrics are rendered too, so its alerts work in either format.

Derived from the native sample set after each collect: no NVML call, no second reading.
"""

from __future__ import annotations

from collections.abc import Mapping

from .exposition import Labels, SampleSet
from .metrics import COUNTER, GAUGE, SPECS, Spec
from .probes import CLOCK_EVENT_REASONS

MIB = float(1 << 20)

# native name, label filter, dcgm name, scale from the native unit, type, help
Rule = tuple[str, tuple[tuple[str, str], ...], str, float, str, str]
_GPM_NAMES: tuple[tuple[str, str, str], ...] = (
    ("graphics_active_ratio", "GR_ENGINE_ACTIVE", "Ratio of time the graphics engine is active."),
    ("sm_active_ratio", "SM_ACTIVE", "The ratio of cycles an SM has at least 1 warp assigned."),
    ("sm_occupancy_ratio", "SM_OCCUPANCY", "The ratio of number of warps resident on an SM."),
    ("tensor_active_ratio", "PIPE_TENSOR_ACTIVE", "Ratio of cycles the tensor pipe is active."),
    ("dram_active_ratio", "DRAM_ACTIVE", "Ratio of cycles the memory interface is active."),
)
_GPM_RULES: tuple[Rule, ...] = tuple(
    (f"gpu_{prefix}gpm_{suffix}", (), f"DCGM_FI_PROF_{name}", 1, GAUGE, what)
    for prefix in ("", "mig_")
    for suffix, name, what in _GPM_NAMES
)
_RULES: tuple[Rule, ...] = (
    ("gpu_utilization_percent", (), "DCGM_FI_DEV_GPU_UTIL", 1, GAUGE, "GPU utilization (in %)."),
    (
        "gpu_memory_copy_utilization_percent",
        (),
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        1,
        GAUGE,
        "Memory utilization (in %).",
    ),
    ("gpu_encoder_utilization_percent", (), "DCGM_FI_DEV_ENC_UTIL", 1, GAUGE, "Encoder (in %)."),
    ("gpu_decoder_utilization_percent", (), "DCGM_FI_DEV_DEC_UTIL", 1, GAUGE, "Decoder (in %)."),
    ("gpu_memory_free_bytes", (), "DCGM_FI_DEV_FB_FREE", 1 / MIB, GAUGE, "FB free (in MiB)."),
    ("gpu_memory_used_bytes", (), "DCGM_FI_DEV_FB_USED", 1 / MIB, GAUGE, "FB used (in MiB)."),
    (
        "gpu_memory_reserved_bytes",
        (),
        "DCGM_FI_DEV_FB_RESERVED",
        1 / MIB,
        GAUGE,
        "FB reserved (in MiB).",
    ),
    ("gpu_memory_total_bytes", (), "DCGM_FI_DEV_FB_TOTAL", 1 / MIB, GAUGE, "FB total (in MiB)."),
    ("gpu_mig_memory_used_bytes", (), "DCGM_FI_DEV_FB_USED", 1 / MIB, GAUGE, ""),
    ("gpu_mig_memory_total_bytes", (), "DCGM_FI_DEV_FB_TOTAL", 1 / MIB, GAUGE, ""),
    ("gpu_temperature_celsius", (), "DCGM_FI_DEV_GPU_TEMP", 1, GAUGE, "GPU temperature (in C)."),
    (
        "gpu_memory_temperature_celsius",
        (),
        "DCGM_FI_DEV_MEMORY_TEMP",
        1,
        GAUGE,
        "Memory temperature (in C).",
    ),
    ("gpu_power_watts", (), "DCGM_FI_DEV_POWER_USAGE", 1, GAUGE, "Power draw (in W)."),
    (
        "gpu_power_limit_watts",
        (),
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
        1,
        GAUGE,
        "Enforced power limit (in W).",
    ),
    (
        "gpu_power_default_limit_watts",
        (),
        "DCGM_FI_DEV_POWER_MGMT_LIMIT_DEF",
        1,
        GAUGE,
        "Default power management limit (in W).",
    ),
    (
        "gpu_energy_joules_total",
        (),
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        1000,
        COUNTER,
        "Total energy consumption since boot (in mJ).",
    ),
    ("gpu_sm_clock_hertz", (), "DCGM_FI_DEV_SM_CLOCK", 1e-6, GAUGE, "SM frequency (in MHz)."),
    (
        "gpu_memory_clock_hertz",
        (),
        "DCGM_FI_DEV_MEM_CLOCK",
        1e-6,
        GAUGE,
        "Memory frequency (in MHz).",
    ),
    (
        "gpu_pcie_replay_total",
        (),
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        1,
        COUNTER,
        "Total number of PCIe retries.",
    ),
    *(
        (
            "gpu_ecc_errors_total",
            (("type", kind), ("scope", scope)),
            f"DCGM_FI_DEV_ECC_{bits}_{short}_TOTAL",
            1,
            COUNTER,
            f"Total {'single' if bits == 'SBE' else 'double'}-bit {scope} ECC errors.",
        )
        for kind, bits in (("corrected", "SBE"), ("uncorrected", "DBE"))
        for scope, short in (("volatile", "VOL"), ("aggregate", "AGG"))
    ),
    (
        "gpu_remapped_rows",
        (("type", "correctable"),),
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        1,
        COUNTER,
        "Number of remapped rows for correctable errors.",
    ),
    (
        "gpu_remapped_rows",
        (("type", "uncorrectable"),),
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        1,
        COUNTER,
        "Number of remapped rows for uncorrectable errors.",
    ),
    (
        "gpu_row_remap_failure",
        (),
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        1,
        GAUGE,
        "Whether remapping of rows has failed.",
    ),
    (
        "gpu_retired_pages",
        (("cause", "single_bit_ecc"),),
        "DCGM_FI_DEV_RETIRED_SBE",
        1,
        COUNTER,
        "Total number of retired pages due to single-bit errors.",
    ),
    (
        "gpu_retired_pages",
        (("cause", "double_bit_ecc"),),
        "DCGM_FI_DEV_RETIRED_DBE",
        1,
        COUNTER,
        "Total number of retired pages due to double-bit errors.",
    ),
    (
        "gpu_retired_pages_pending",
        (),
        "DCGM_FI_DEV_RETIRED_PENDING",
        1,
        GAUGE,
        "Whether a page retirement is pending.",
    ),
    *(
        (
            "gpu_nvlink_errors_total",
            (("type", kind),),
            f"DCGM_FI_DEV_NVLINK_{name}_ERROR_COUNT_TOTAL",
            1,
            COUNTER,
            f"Total number of NVLink {what} errors.",
        )
        for kind, name, what in (
            ("crc_flit", "CRC_FLIT", "flow-control CRC"),
            ("crc_data", "CRC_DATA", "data CRC"),
            ("replay", "REPLAY", "retries"),
            ("recovery", "RECOVERY", "recovery"),
        )
    ),
    *(
        (
            "gpu_clock_event_violation_seconds_total",
            (("policy", policy),),
            f"DCGM_FI_DEV_{name}_VIOLATION",
            1e6,
            COUNTER,
            f"Throttling duration due to {what} constraints (in us).",
        )
        for policy, name, what in (
            ("power", "POWER", "power"),
            ("thermal", "THERMAL", "thermal"),
            ("sync_boost", "SYNC_BOOST", "sync-boost"),
            ("board_limit", "BOARD_LIMIT", "board limit"),
            ("low_utilization", "LOW_UTIL", "low utilization"),
            ("reliability", "RELIABILITY", "reliability"),
        )
    ),
    *_GPM_RULES,
    (
        "gpu_gpm_pcie_transmit_bytes_per_second",
        (),
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        1,
        GAUGE,
        "The rate of data transmitted over the PCIe bus, in bytes per second.",
    ),
    (
        "gpu_gpm_pcie_receive_bytes_per_second",
        (),
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        1,
        GAUGE,
        "The rate of data received over the PCIe bus, in bytes per second.",
    ),
)

_BY_NATIVE: dict[str, list[Rule]] = {}
for _rule in _RULES:
    _BY_NATIVE.setdefault(_rule[0], []).append(_rule)

_EXTRA = (
    Spec("DCGM_FI_DEV_XID_ERRORS", GAUGE, "Value of the last XID error encountered."),
    Spec(
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        GAUGE,
        "Current clock event (throttle) reasons, a bit mask.",
    ),
)
_SELF = tuple(s for s in SPECS.values() if s.name.startswith("gpu_exporter_"))
_SELF_NAMES = frozenset(s.name for s in _SELF)
_DCGM_SPECS: dict[str, Spec] = {}
for _rule in _RULES:
    if _rule[2] not in _DCGM_SPECS:
        _DCGM_SPECS[_rule[2]] = Spec(_rule[2], _rule[4], _rule[5])
for _spec in (*_EXTRA, *_SELF):
    _DCGM_SPECS[_spec.name] = _spec
SPECS_DCGM: dict[str, Spec] = _DCGM_SPECS
ORDER_DCGM: dict[str, int] = {name: i for i, name in enumerate(_DCGM_SPECS)}
_REASON_BITS = dict(CLOCK_EVENT_REASONS)
_OWNER_KEYS = ("namespace", "pod", "container")


def render(native: SampleSet, last_xid: Mapping[str, int]) -> bytes:
    """The dcgm-exporter exposition of one collect's native samples."""
    out = SampleSet(SPECS_DCGM, ORDER_DCGM)
    gpu_owners, mig_owners = _owners(native)
    drivers = {}
    for labels in native.get("gpu_info"):
        lab = dict(labels)
        drivers[lab.get("uuid", "")] = lab.get("driver_version", "")
    for name in native.names():
        samples = native.get(name)
        if name in _SELF_NAMES:
            for labels, value in samples.items():
                out.add(name, dict(labels), value)
            continue
        rules = _BY_NATIVE.get(name)
        if rules is None:
            continue
        for labels, value in samples.items():
            lab = dict(labels)
            for _, match, dcgm_name, scale, _, _ in rules:
                if any(lab.get(k) != v for k, v in match):
                    continue
                converted = value * scale
                if dcgm_name.startswith("DCGM_FI_DEV_FB_"):
                    converted = float(int(converted))  # whole MiB, as DCGM reports them
                for dl in _labels(lab, drivers, gpu_owners, mig_owners):
                    out.add(dcgm_name, dl, converted)
    masks: dict[Labels, int] = {}
    for labels, value in native.get("gpu_clock_event_active").items():
        lab = dict(labels)
        key = tuple((k, v) for k, v in lab.items() if k != "reason")
        masks[key] = masks.get(key, 0) | (_REASON_BITS[lab["reason"]] if value else 0)
    for key, mask in masks.items():
        for dl in _labels(dict(key), drivers, gpu_owners, mig_owners):
            out.add("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", dl, mask)
    for labels in native.get("gpu_info"):
        lab = {k: v for k, v in labels if k in ("gpu", "uuid", "pci_bus_id", "model", "node")}
        for dl in _labels(lab, drivers, gpu_owners, mig_owners):
            out.add("DCGM_FI_DEV_XID_ERRORS", dl, last_xid.get(lab["uuid"], 0))
    return out.render()


Owners = dict[str, list[dict[str, str]]]


def _owners(native: SampleSet) -> tuple[Owners, Owners]:
    gpus: Owners = {}
    migs: Owners = {}
    for labels in native.get("gpu_allocation_info"):
        lab = dict(labels)
        owner = {k: lab[k] for k in _OWNER_KEYS}
        if "mig_uuid" in lab:
            migs.setdefault(lab["mig_uuid"], []).append(owner)
        else:
            gpus.setdefault(lab["uuid"], []).append(owner)
    return gpus, migs


def _labels(
    lab: dict[str, str], drivers: Mapping[str, str], gpus: Owners, migs: Owners
) -> list[dict[str, str]]:
    """dcgm-exporter's label set for a native sample's labels, once per pod holding it."""
    uuid = lab.get("uuid", "")
    base = {
        "gpu": lab.get("gpu", ""),
        "UUID": uuid,
        "pci_bus_id": lab.get("pci_bus_id", ""),
        "device": f"nvidia{lab.get('gpu', '')}",
        "modelName": lab.get("model", ""),
        "Hostname": lab.get("node", ""),
        "DCGM_FI_DRIVER_VERSION": drivers.get(uuid, ""),
    }
    if "mig_uuid" in lab:
        base["GPU_I_ID"] = lab["gpu_instance"]
        owners = migs.get(lab["mig_uuid"], [])
    else:
        owners = gpus.get(uuid, [])
    if not owners:
        return [base]
    return [{**base, **owner} for owner in owners]
