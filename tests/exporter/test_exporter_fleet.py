"""Issue #14 on the stand-in: hung calls, index ids, counters across holders, v1/v2 memory,
retried NOT_SUPPORTED, the newer temperature call, MIG GPM, GPUs lost at start, GPM samples
and windows. Each test drives the real exporter process over the C libnvidia-ml stand-in."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import GIB, Scenario, h100, t4

H100 = h100(0)
T4 = t4(1)
DEADLINE = 10.0  # a quiet machine's time; `wait_scrape` scales it for a busy one


def _json(exp, path: str) -> tuple[int, dict]:
    status, _, body = exp.get(path)
    return status, json.loads(body)


# --- 1. a hung NVML call --------------------------------------------------------------------
def test_a_hung_gpu_marks_only_itself_stale(scenario: Scenario, start_exporter) -> None:
    exp = start_exporter(scenario)
    exp.wait_collects(2)
    scenario.gpus[1]["hang"] = "nvmlDeviceGetPowerUsage"
    scenario.gpus[0]["util_gpu"] = 55
    scenario.write()
    s = exp.wait_scrape(
        lambda s: s.get("gpu_exporter_gpu_stale", gpu="1") == 1,
        DEADLINE,
        what="GPU 1 marked stale while its power call hangs",
    )
    # the other GPU keeps moving: a new value shows while GPU 1's call is still hung
    s = exp.wait_scrape(
        lambda s: s.get("gpu_utilization_percent", gpu="0") == 55,
        DEADLINE,
        what="GPU 0 readings still updating",
    )
    assert s.value("gpu_exporter_gpu_stale", gpu="0") == 0
    assert s.value("gpu_exporter_gpu_stale", gpu="1", uuid=T4["uuid"]) == 1
    assert not s.has("gpu_utilization_percent", gpu="1")  # withheld, not frozen
    assert s.has("gpu_info", gpu="1")
    assert s.value("gpu_exporter_nvml_up") == 1
    first = s.value("gpu_exporter_gpu_last_collect_timestamp_seconds", gpu="0")
    s = exp.wait_scrape(
        lambda s: s.value("gpu_exporter_gpu_last_collect_timestamp_seconds", gpu="0") > first,
        DEADLINE,
        what="GPU 0 collect time advancing",
    )
    assert "GPU 1 ({}) is stale: power".format(T4["uuid"]) in exp.output()
    status, ready = _json(exp, "/ready")
    assert status == 503 and ready["problems"] == ["1 GPU(s) stale"], ready
    assert _json(exp, "/health")[0] == 200  # one wedged GPU is no reason to restart

    del scenario.gpus[1]["hang"]
    scenario.write()
    s = exp.wait_scrape(
        lambda s: s.get("gpu_utilization_percent", gpu="1") == 12,
        DEADLINE,
        what="GPU 1 back once its call returned",
    )
    assert s.value("gpu_exporter_gpu_stale", gpu="1") == 0
    exp.wait_scrape(lambda s: _json(exp, "/ready")[0] == 200, DEADLINE, what="/ready 200 again")


def test_a_hang_at_start_still_serves_self_metrics(scenario: Scenario, start_exporter) -> None:
    """A restarted pod on a node with a wedged GPU: nvmlInit itself hangs."""
    scenario.system["hang_init"] = 1
    exp = start_exporter(scenario.write())
    s = exp.wait_scrape(
        lambda s: s.get("gpu_exporter_nvml_session_stuck") == 1,
        DEADLINE,
        what="the session marked stuck while nvmlInit hangs",
    )
    assert s.value("gpu_exporter_nvml_up") == 0
    assert s.value("gpu_exporter_collects_total") >= 1
    status, health = _json(exp, "/health")
    assert status == 503 and health["status"] == "stuck", health
    assert "nvmlInit" in health["problems"][0]
    assert _json(exp, "/ready")[0] == 503

    scenario.system["hang_init"] = 0
    scenario.write()
    s = exp.wait_scrape(
        lambda s: s.get("gpu_utilization_percent", gpu="0") == 87,
        DEADLINE,
        what="GPUs once nvmlInit returned",
    )
    assert s.value("gpu_exporter_nvml_session_stuck") == 0
    exp.wait_scrape(lambda s: _json(exp, "/health")[0] == 200, DEADLINE, what="/health 200 again")


def test_a_gpu_hung_at_discovery_does_not_hold_the_others(
    scenario: Scenario, start_exporter
) -> None:
    scenario.gpus[0]["hang"] = "*"
    exp = start_exporter(scenario.write())
    s = exp.wait_scrape(
        lambda s: (
            s.get("gpu_exporter_gpu_stale", gpu="0") == 1
            and s.has("gpu_utilization_percent", gpu="1")
        ),
        DEADLINE,
        what="GPU 0 stale at discovery, GPU 1 exported",
    )
    assert s.value("gpu_utilization_percent", gpu="1", uuid=T4["uuid"]) == 12
    assert s.value("gpu_exporter_gpus") == 2
    status, health = _json(exp, "/health")
    assert status == 200, health
    # the healthy GPU's XIDs are still watched
    scenario.xids.append((1, 31))
    scenario.write()
    exp.wait_scrape(
        lambda s: s.get("gpu_xid_errors_total", gpu="1", xid="31") == 1,
        DEADLINE,
        what="an XID on the healthy GPU counted while GPU 0 hangs",
    )


def test_every_gpu_hung_fails_liveness(scenario: Scenario, start_exporter) -> None:
    exp = start_exporter(scenario)
    exp.wait_collects(2)
    for gpu in scenario.gpus:
        gpu["hang"] = "nvmlDeviceGetUtilizationRates"
    scenario.write()
    exp.wait_scrape(
        lambda s: _json(exp, "/health")[0] == 503,
        DEADLINE,
        what="/health 503 with every GPU stale",
    )
    assert _json(exp, "/health")[1]["problems"] == ["every GPU is stale"]
    assert exp.scrape().value("gpu_exporter_nvml_up") == 1
    for gpu in scenario.gpus:
        del gpu["hang"]
    scenario.write()
    exp.wait_scrape(lambda s: _json(exp, "/health")[0] == 200, DEADLINE, what="/health 200 again")


# --- 2 and 3. pods by any device id; counters stay on the GPU ---------------------------------
def test_pods_by_index_gke_and_mig_resource_ids(tmp_path: Path, start_exporter, kubelet) -> None:
    mig_uuid = "MIG-dddd0000-0000-0000-0000-000000000001"
    gpus = [h100(0), t4(1), h100(2, mig_mode=1), t4(3)]
    sc = Scenario(tmp_path / "ids.ini", gpus=gpus)
    sc.migs[2] = [{"uuid": mig_uuid, "gi": 3, "ci": 0, "mem_total": 10 * GIB, "mem_used": GIB}]
    kubelet.pod("inference", "by-index", {"server": ["0"]})  # DEVICE_ID_STRATEGY=index
    kubelet.pod("inference", "by-gke-id", {"server": ["nvidia1"]})  # GKE
    kubelet.pod("ml", "mig-user", {"lab": [mig_uuid]}, resource="nvidia.com/mig-1g.10gb")
    # every pod also holds an example.com/nic device "0": it must not make it GPU 0's holder
    exp = start_exporter(sc.write(), pod_socket=str(kubelet.socket_path))
    s = exp.wait_scrape(
        lambda s: s.has("gpu_allocation_info", pod="mig-user"),
        DEADLINE,
        what="the MIG resource attributed",
    )
    assert s.value("gpu_utilization_percent", gpu="0", pod="by-index") == 87
    assert s.value("gpu_utilization_percent", gpu="1", pod="by-gke-id") == 12
    assert [lab["pod"] for lab, _ in s.find("gpu_allocation_info", gpu="0")] == ["by-index"]
    assert s.value("gpu_mig_memory_used_bytes", mig_uuid=mig_uuid, pod="mig-user") == GIB
    assert not s.has("gpu_allocation_info", gpu="3")


def test_counters_stay_on_the_gpu_when_its_holder_changes(
    scenario: Scenario, start_exporter, kubelet
) -> None:
    uuid = H100["uuid"]
    kubelet.pod("team-a", "pod-a", {"main": [uuid]})
    exp = start_exporter(scenario, pod_socket=str(kubelet.socket_path), interval=1.0)
    exp.wait_scrape(lambda s: s.has("gpu_allocation_info", pod="pod-a"), DEADLINE, what="pod A")
    scenario.xids.append((0, 79))
    scenario.write()
    s = exp.wait_scrape(
        lambda s: s.has("gpu_xid_errors_total", gpu="0"), DEADLINE, what="the XID counted"
    )
    before = {
        name: s.find(name, gpu="0")
        for name in ("gpu_xid_errors_total", "gpu_energy_joules_total", "gpu_ecc_errors_total")
    }
    for name, found in before.items():
        assert found and all("pod" not in lab for lab, _ in found), (name, found)
    assert s.value("gpu_utilization_percent", gpu="0", pod="pod-a") == 87  # gauges: the holder

    kubelet.pods.clear()
    kubelet.pod("team-b", "pod-b", {"main": [uuid]})
    s = exp.wait_scrape(lambda s: s.has("gpu_allocation_info", pod="pod-b"), DEADLINE, what="pod B")
    for name, found in before.items():
        assert sorted(map(str, s.find(name, gpu="0"))) == sorted(map(str, found)), name
    assert s.value("gpu_utilization_percent", gpu="0", pod="pod-b") == 87
    assert not s.has("gpu_allocation_info", pod="pod-a")


def test_process_memory_names_the_pod_holding_the_gpu(
    scenario: Scenario, start_exporter, kubelet
) -> None:
    kubelet.pod("inference", "vllm-0", {"server": [H100["uuid"]]})
    kubelet.pod("batch", "job-a", {"w": [T4["uuid"] + "::0"]})
    kubelet.pod("batch", "job-b", {"w": [T4["uuid"] + "::1"]})
    scenario.gpus[1]["procs"] = "777:1048576"
    exp = start_exporter(scenario.write(), pod_socket=str(kubelet.socket_path))
    s = exp.wait_scrape(lambda s: s.has("gpu_allocation_info", pod="job-b"), DEADLINE, what="pods")
    labels, value = s.find("gpu_process_memory_used_bytes", pid="4242")[0]
    assert (labels["namespace"], labels["pod"], labels["container"], value) == (
        "inference",
        "vllm-0",
        "server",
        GIB,
    )
    # a time-sliced GPU: which of its pods runs pid 777 is not known, so no pod is claimed
    assert "pod" not in s.find("gpu_process_memory_used_bytes", pid="777")[0][0]


# --- 4 and 6. memory as nvidia-smi shows it; the newer temperature call --------------------
def test_memory_used_excludes_the_driver_reservation(scenario: Scenario, start_exporter) -> None:
    exp = start_exporter(scenario)
    s = exp.wait_collects(2)
    h = {"gpu": "0"}
    assert s.value("gpu_memory_used_bytes", **h) == 60 * GIB  # v2, as nvidia-smi
    assert s.value("gpu_memory_reserved_bytes", **h) == GIB // 2
    assert s.value("gpu_memory_used_bytes", **h) + s.value("gpu_memory_free_bytes", **h) + s.value(
        "gpu_memory_reserved_bytes", **h
    ) == s.value("gpu_memory_total_bytes", **h)
    # the T4's driver has no v2: v1's "used" includes the reservation, and no reserved series
    assert s.value("gpu_memory_used_bytes", gpu="1") == 2 * GIB + (256 << 20)
    assert not s.has("gpu_memory_reserved_bytes", gpu="1")


def test_temperature_uses_the_newer_call(scenario: Scenario, start_exporter) -> None:
    """A driver that dropped the call pynvml marks for removal still has a temperature."""
    scenario.gpus[0]["unsupported"] += ",nvmlDeviceGetTemperature"
    exp = start_exporter(scenario.write())
    s = exp.wait_collects(2)
    assert s.value("gpu_temperature_celsius", gpu="0") == 64
    assert not s.has("gpu_exporter_unsupported_metric", call="temperature")


def test_an_older_driver_falls_back(
    scenario: Scenario, start_exporter, old_driver_nvml_dir: Path
) -> None:
    exp = start_exporter(scenario, lib_dir=old_driver_nvml_dir)
    s = exp.wait_collects(2)
    assert s.value("gpu_temperature_celsius", gpu="0") == 64  # nvmlDeviceGetTemperature
    assert s.value("gpu_memory_used_bytes", gpu="0") == 60 * GIB + GIB // 2  # v1 semantics
    assert not s.has("gpu_memory_reserved_bytes")
    assert not s.has("gpu_exporter_failing_metric")


# --- 5. NOT_SUPPORTED and errors that come and go ------------------------------------------
def test_not_supported_is_retried_and_errors_are_told_apart(
    scenario: Scenario, start_exporter
) -> None:
    scenario.gpus[0]["unsupported"] += ",nvmlDeviceGetUtilizationRates"  # as with MIG on
    scenario.gpus[1]["fail"] = "nvmlDeviceGetPowerUsage"
    exp = start_exporter(scenario.write())
    s = exp.wait_scrape(
        lambda s: (
            s.has("gpu_exporter_unsupported_metric", gpu="0", call="utilization")
            and s.has("gpu_exporter_failing_metric", gpu="1", call="power")
        ),
        DEADLINE,
        what="unsupported and failing probes reported",
    )
    assert not s.has("gpu_utilization_percent", gpu="0")
    assert not s.has("gpu_exporter_failing_metric", gpu="0", call="utilization")
    assert not s.has("gpu_exporter_unsupported_metric", gpu="1", call="power")
    assert s.value("gpu_exporter_nvml_errors_total", call="power") >= 1
    assert not s.has("gpu_exporter_nvml_errors_total", call="utilization")

    scenario.gpus[0]["unsupported"] = H100["unsupported"]  # MIG switched off
    del scenario.gpus[1]["fail"]
    scenario.write()
    # retried after 25 collects (5 s at 0.2 s) or 30 s
    s = exp.wait_scrape(
        lambda s: (
            s.get("gpu_utilization_percent", gpu="0") == 87 and s.has("gpu_power_watts", gpu="1")
        ),
        DEADLINE,
        what="utilization back after NOT_SUPPORTED went away, power back after the error",
    )
    assert not s.has("gpu_exporter_unsupported_metric", call="utilization")
    assert not s.has("gpu_exporter_failing_metric")
    assert "GPU 0: utilization answers again" in exp.output()


# --- 7. MIG utilization per instance --------------------------------------------------------
def test_mig_instances_have_gpm_utilization(tmp_path: Path, start_exporter) -> None:
    sc = Scenario(tmp_path / "mig-gpm.ini", gpus=[h100(0, mig_mode=1)])
    sc.migs[0] = [
        {"uuid": "MIG-e1", "gi": 1, "ci": 0, "mem_total": 20 * GIB, "mem_used": GIB,
         "gpm_sm_util": 40.0, "gpm_tensor": 10.0, "gpm_gr": 50.0},
        {"uuid": "MIG-e2", "gi": 2, "ci": 0, "mem_total": 20 * GIB, "mem_used": GIB,
         "gpm_sm_util": 80.0, "gpm_tensor": 20.0, "gpm_gr": 90.0},
    ]  # fmt: skip
    exp = start_exporter(sc.write())
    s = exp.wait_scrape(
        lambda s: len(s.find("gpu_mig_gpm_sm_active_ratio")) == 2,
        DEADLINE,
        what="per-instance GPM",
    )
    assert s.value("gpu_mig_gpm_sm_active_ratio", mig_uuid="MIG-e1", gpu_instance="1") == 0.4
    assert s.value("gpu_mig_gpm_tensor_active_ratio", mig_uuid="MIG-e2") == 0.2
    assert s.value("gpu_mig_gpm_graphics_active_ratio", mig_uuid="MIG-e2") == 0.9


# --- 8. a GPU lost at start comes back -------------------------------------------------------
def test_a_gpu_lost_at_start_comes_back_without_a_restart(
    scenario: Scenario, start_exporter
) -> None:
    scenario.gpus[0]["lost"] = 1
    exp = start_exporter(scenario.write())
    s = exp.wait_collects(3)
    assert s.value("gpu_lost", gpu="0") == 1
    scenario.gpus[0]["lost"] = 0
    scenario.write()
    # NVML enumerates GPUs at init: the exporter re-initialises to find it (25 collects/30 s)
    s = exp.wait_scrape(
        lambda s: s.get("gpu_utilization_percent", gpu="0") == 87,
        DEADLINE,
        what="GPU 0 found again by re-initialising NVML",
    )
    labels, _ = s.find("gpu_info", gpu="0")[0]
    assert labels["uuid"] == H100["uuid"] and labels["model"] == H100["name"]
    assert s.value("gpu_lost", gpu="0") == 0
    assert s.value("gpu_exporter_nvml_inits_total", result="success") >= 2


# --- 10. GPM samples and windows ---------------------------------------------------------------
def test_gpm_samples_are_freed_across_reinitialisations(scenario: Scenario, start_exporter) -> None:
    scenario.system["gpm_sample_limit"] = 4  # two sessions' worth for the one GPM GPU
    exp = start_exporter(scenario.write())
    exp.wait_scrape(lambda s: s.has("gpu_gpm_sm_active_ratio"), DEADLINE, what="GPM")
    for epoch in (1, 2, 3):
        scenario.system["epoch"] = epoch
        scenario.write()
        exp.wait_scrape(
            lambda s, n=epoch + 1: s.get("gpu_exporter_nvml_inits_total", result="success") == n,
            DEADLINE,
            what=f"re-initialisation {epoch}",
        )
        exp.wait_scrape(
            lambda s: s.get("gpu_gpm_sm_active_ratio", gpu="0") == 0.75,
            DEADLINE,
            what=f"GPM after re-initialisation {epoch} (samples of old sessions freed)",
        )


def test_gpm_windows_never_drop_below_100ms(scenario: Scenario, start_exporter) -> None:
    exp = start_exporter(scenario, interval=0.03)
    s = exp.wait_scrape(
        lambda s: (
            s.get("gpu_exporter_collects_total", 0) >= 30 and s.has("gpu_gpm_sm_active_ratio")
        ),
        DEADLINE,
        what="30 collects at 30 ms with GPM",
    )
    assert not s.has("gpu_exporter_nvml_errors_total", call="gpm"), s.text
    assert not s.has("gpu_exporter_failing_metric", call="gpm")
    assert s.value("gpu_gpm_sm_active_ratio", gpu="0") == 0.75


def test_utilization_help_says_what_it_measures(scenario: Scenario, start_exporter) -> None:
    exp = start_exporter(scenario)
    s = exp.wait_collects(1)
    help_line = next(
        line for line in s.text.splitlines() if line.startswith("# HELP gpu_utilization_percent")
    )
    assert "kernel" in help_line and "SM)" not in help_line
