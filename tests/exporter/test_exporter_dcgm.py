"""The dcgm-compatible exposition: names, units and labels of dcgm-exporter, proved by running
the queries of NVIDIA's published dashboard and the common HPA rule (dcgm_queries.yaml) with
`promtool test rules` over series taken from a real scrape of the exporter."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import GIB, Scenario, Scrape, h100, t4

HERE = Path(__file__).parent
QUERIES = yaml.safe_load((HERE / "dcgm_queries.yaml").read_text())
H100, T4 = h100(0), t4(1)
INSTANCE, JOB = "10.0.0.7:9400", "gpu-exporter"
POD = {"namespace": "ml", "pod": "trainer-0", "container": "main"}
MIB = 1 << 20


def dcgm_labels(gpu: dict[str, Any], index: int) -> dict[str, str]:
    """What dcgm-exporter puts on a GPU's series, written out from the scenario."""
    labels = {
        "gpu": str(index),
        "UUID": gpu["uuid"],
        "pci_bus_id": gpu["pci_bus_id"],
        "device": f"nvidia{index}",
        "modelName": gpu["name"],
        "Hostname": "gpu-node-7",
        "DCGM_FI_DRIVER_VERSION": "550.54.15",
    }
    return {**labels, **POD} if index == 0 else labels


@pytest.fixture
def dcgm_scrape(scenario: Scenario, start_exporter, kubelet) -> tuple[Any, Scrape]:
    kubelet.pod("ml", "trainer-0", {"main": [H100["uuid"]]})
    scenario.xids.append((0, 48))
    exp = start_exporter(scenario.write(), "--format", "both", pod_socket=str(kubelet.socket_path))
    s = exp.wait_scrape(
        lambda s: (
            s.has("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", pod="trainer-0")
            and s.get("DCGM_FI_DEV_XID_ERRORS", gpu="0") == 48
        ),
        30,
        path="/metrics/dcgm",
        what="dcgm series with pod labels, GPM and the XID",
    )
    return exp, s


def test_dcgm_names_units_and_labels(dcgm_scrape: tuple[Any, Scrape]) -> None:
    exp, s = dcgm_scrape
    g0 = {"gpu": "0", "UUID": H100["uuid"]}
    labels, _ = s.find("DCGM_FI_DEV_GPU_UTIL", **g0)[0]
    assert labels == dcgm_labels(H100, 0)
    assert s.value("DCGM_FI_DEV_GPU_UTIL", **g0) == 87
    assert s.value("DCGM_FI_DEV_FB_USED", **g0) == 60 * GIB // MIB  # MiB, v2 "used"
    assert s.value("DCGM_FI_DEV_FB_FREE", **g0) == (80 * GIB - 60 * GIB - GIB // 2) // MIB
    assert s.value("DCGM_FI_DEV_FB_RESERVED", **g0) == 512
    assert s.value("DCGM_FI_DEV_SM_CLOCK", **g0) == 1980  # MHz
    assert s.value("DCGM_FI_DEV_MEM_CLOCK", **g0) == 2619
    assert s.value("DCGM_FI_DEV_POWER_USAGE", **g0) == 612.5  # W
    assert s.value("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", **g0) == 123_456_789  # mJ
    assert s.value("DCGM_FI_DEV_GPU_TEMP", **g0) == 64
    assert s.value("DCGM_FI_DEV_MEMORY_TEMP", **g0) == 71
    assert s.value("DCGM_FI_DEV_POWER_VIOLATION", **g0) == 2_500_000  # us
    assert s.value("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", **g0) == 5
    assert s.value("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", **g0) == 1
    assert s.value("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", **g0) == 3
    assert s.value("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", **g0) == 0x4 | 0x40
    assert s.value("DCGM_FI_PROF_SM_ACTIVE", **g0) == 0.75
    assert s.value("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", **g0) == 0.25
    assert s.value("DCGM_FI_PROF_DRAM_ACTIVE", **g0) == 0.625
    assert s.value("DCGM_FI_DEV_XID_ERRORS", **g0) == 48
    assert s.value("DCGM_FI_DEV_XID_ERRORS", gpu="1") == 0
    # the T4: no pod, v1 memory, no GPM
    assert "pod" not in s.find("DCGM_FI_DEV_GPU_UTIL", gpu="1")[0][0]
    assert not s.has("DCGM_FI_PROF_SM_ACTIVE", gpu="1")
    # the exporter's own health is in both formats; /metrics stays native with --format both
    assert s.value("gpu_exporter_nvml_up") == 1
    assert exp.scrape().has("gpu_utilization_percent", gpu="0")
    assert not exp.scrape().has("DCGM_FI_DEV_GPU_UTIL")


def test_the_gaps_dcgm_exporter_users_rely_on(tmp_path: Path, start_exporter) -> None:
    """GR engine active and PCIe throughput (GPM), retired pages, NVLink error counters."""
    gpus = [
        h100(0, gpm_gr=66.0, gpm_pcie_tx_mib=100.0, gpm_pcie_rx_mib=50.0, nvlink_crc_flit=7,
             nvlink_crc_data=1, nvlink_replay=2, nvlink_recovery=3),
        t4(1, retired_sbe=2, retired_dbe=1, retired_pending=1),
    ]  # fmt: skip
    exp = start_exporter(Scenario(tmp_path / "gaps.ini", gpus=gpus).write(), "--format", "dcgm")
    s = exp.wait_scrape(
        lambda s: s.has("DCGM_FI_PROF_GR_ENGINE_ACTIVE"), 30, what="GPM in the dcgm format"
    )
    assert s.value("DCGM_FI_PROF_GR_ENGINE_ACTIVE", gpu="0") == 0.66
    assert s.value("DCGM_FI_PROF_PCIE_TX_BYTES", gpu="0") == 100 * MIB  # bytes per second
    assert s.value("DCGM_FI_PROF_PCIE_RX_BYTES", gpu="0") == 50 * MIB
    assert s.value("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", gpu="0") == 7
    assert s.value("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", gpu="0") == 3
    assert s.value("DCGM_FI_DEV_RETIRED_SBE", gpu="1") == 2
    assert s.value("DCGM_FI_DEV_RETIRED_DBE", gpu="1") == 1
    assert s.value("DCGM_FI_DEV_RETIRED_PENDING", gpu="1") == 1
    assert not s.has("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", gpu="1")  # no NVLink
    # --format dcgm: /metrics is the dcgm one; the native one stays at /metrics/native
    native = exp.scrape("/metrics/native")
    assert native.value("gpu_retired_pages", gpu="1", cause="single_bit_ecc") == 2
    assert native.value("gpu_nvlink_errors_total", gpu="0", type="replay") == 2
    assert native.value("gpu_gpm_pcie_transmit_bytes_per_second", gpu="0") == 100 * MIB


# --- the queries, evaluated by Prometheus's own engine (promtool) ------------------------------
def _selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _series(s: Scrape, relabel: dict[str, str], target: dict[str, str]) -> list[dict[str, str]]:
    """The scrape as Prometheus stores it: target labels added, clashing ones renamed."""
    out = []
    for name, labels, value in s.samples:
        if not name.startswith("DCGM_"):
            continue
        stored = {relabel.get(k, k): v for k, v in labels.items()}
        out.append({"series": _selector(name, {**stored, **target}), "values": f"{value}x10"})
    return out


def _expected(name_kept: bool, metric: str, values: dict[int, float]) -> list[dict[str, Any]]:
    gpus = {0: H100, 1: T4}
    out = []
    for index, value in values.items():
        labels = {**dcgm_labels(gpus[index], index), "instance": INSTANCE, "job": JOB}
        out.append({"labels": _selector(metric if name_kept else "", labels), "value": value})
    return out


def _dashboard_cases() -> list[dict[str, Any]]:
    """Each panel's query with Grafana's "All" substitution, and what it must return, written
    from the scenario: one series per GPU with dcgm-exporter's labels, in its units."""
    panels = QUERIES["dashboard"]["panels"]
    subst = {"$instance": re.escape(INSTANCE).replace("\\", "\\\\"), "$gpu": "0|1"}

    def expr(title: str) -> str:
        text = panels[title]
        for var, value in subst.items():
            text = text.replace(var, value)
        return text

    used_t4 = (2 * GIB + (256 << 20)) // MIB  # no v2 on the T4: v1's "used"
    cases = [
        (expr("GPU Temperature"), _expected(True, "DCGM_FI_DEV_GPU_TEMP", {0: 64, 1: 45})),
        (expr("GPU Avg. Temp"), [{"labels": "{}", "value": 54.5}]),
        (expr("GPU Power Usage"), _expected(True, "DCGM_FI_DEV_POWER_USAGE", {0: 612.5, 1: 27})),
        (expr("GPU Power Total"), [{"labels": "{}", "value": 639.5}]),
        (expr("GPU SM Clocks"), _expected(False, "", {0: 1980e6, 1: 585e6})),
        (expr("GPU Utilization"), _expected(True, "DCGM_FI_DEV_GPU_UTIL", {0: 87, 1: 12})),
        (
            expr("GPU Framebuffer Mem Used"),
            _expected(True, "DCGM_FI_DEV_FB_USED", {0: 60 * 1024, 1: used_t4}),
        ),
        (
            expr("Tensor Core Utilization"),
            _expected(True, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", {0: 0.25}),
        ),
    ]
    # Grafana's label_values(metric, label) lists the label's values over the metric's series
    for variable, query in QUERIES["dashboard"]["variables"].items():
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", query).groups()
        values = {"instance": [INSTANCE], "gpu": ["0", "1"]}[variable]
        count = 1 if label == "gpu" else 2  # series per value: one per GPU, two per instance
        expected = [{"labels": f'{{{label}="{v}"}}', "value": count} for v in values]
        cases.append((f"count by ({label}) ({metric})", expected))
    return [{"expr": e, "eval_time": "5m", "exp_samples": exp} for e, exp in cases]


def _hpa_case(rule: dict[str, Any]) -> dict[str, Any]:
    """prometheus-adapter's expansion of metricsQuery for a GET of pod ml/trainer-0."""
    ns, pod = rule["resources"]["namespace"], rule["resources"]["pod"]
    expr = (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
        .replace("<<.LabelMatchers>>", f'{ns}="ml",{pod}=~"trainer-0"')
        .replace("<<.GroupBy>>", f"{ns}, {pod}")
    )
    return {
        "expr": expr,
        "eval_time": "5m",
        "exp_samples": [{"labels": f'{{{ns}="ml", {pod}="trainer-0"}}', "value": 87}],
    }


def test_nvidia_dashboard_and_hpa_queries_work_unchanged(
    dcgm_scrape: tuple[Any, Scrape], tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install it (apt-get install -y prometheus)")
    _, s = dcgm_scrape
    target = {"instance": INSTANCE, "job": JOB}
    honor = QUERIES["hpa"]["honor_labels"]
    exported = QUERIES["hpa"]["exported_labels"]
    # honorLabels: false, Prometheus keeps the target's namespace/pod and renames the exporter's
    renamed = {"namespace": "exported_namespace", "pod": "exported_pod",
               "container": "exported_container"}  # fmt: skip
    daemonset = {**target, "namespace": "gpu-monitoring", "pod": "tollgate-gpu-exporter-x7k2p"}
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "NVIDIA's dashboard and the HPA rule, honorLabels: true",
                "interval": "1m",
                "input_series": _series(s, {}, target),
                "promql_expr_test": [*_dashboard_cases(), _hpa_case(honor)],
            },
            {
                "name": "the HPA rule on exported_namespace/exported_pod, honorLabels: false",
                "interval": "1m",
                "input_series": _series(s, renamed, daemonset),
                "promql_expr_test": [_hpa_case(exported)],
            },
        ],
    }
    path = tmp_path / "dcgm-queries-test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"{result.stdout}{result.stderr}\n--- scrape ---\n{s.text}\n--- test ---\n"
        f"{path.read_text()}"
    )
    assert "SUCCESS" in result.stdout
    # every dashboard panel and variable was evaluated, plus the two HPA spellings
    assert len(tests["tests"][0]["promql_expr_test"]) == 8 + 2 + 1
