"""Pod attribution from a real gRPC server speaking kubelet pod-resources v1."""

from __future__ import annotations

from pathlib import Path

from conftest import GIB, Scenario, h100, t4

MIG1 = "MIG-cccc0000-0000-0000-0000-000000000001"


def test_pod_labels_from_the_kubelet(tmp_path: Path, start_exporter, kubelet) -> None:
    gpus = [h100(0), t4(1), h100(2, mig_mode=1), t4(3)]
    sc = Scenario(tmp_path / "pods.ini", gpus=gpus)
    sc.migs[2] = [
        {"uuid": MIG1, "gi": 1, "ci": 0, "mem_total": 10 * GIB, "mem_used": GIB},
        {"uuid": "MIG-cccc-2", "gi": 2, "ci": 0, "mem_total": 10 * GIB, "mem_used": 2 * GIB},
    ]
    kubelet.pod("inference", "vllm-0", {"server": [gpus[0]["uuid"]]})
    # a time-sliced GPU shared by two pods: replica suffixes must be stripped
    kubelet.pod("batch", "job-a", {"worker": [gpus[1]["uuid"] + "::0"]})
    kubelet.pod("batch", "job-b", {"worker": [gpus[1]["uuid"] + "::3"]})
    # MIG instances, by MIG UUID and by the older MIG-GPU-<uuid>/<gi>/<ci> naming
    kubelet.pod("ml", "notebook", {"lab": [MIG1], "sidecar": [f"MIG-{gpus[2]['uuid']}/2/0"]})
    exp = start_exporter(sc.write(), pod_socket=str(kubelet.socket_path))
    s = exp.wait_scrape(lambda s: s.has("gpu_allocation_info", pod="notebook"))

    vllm = {"pod": "vllm-0", "namespace": "inference", "container": "server"}
    assert s.value("gpu_utilization_percent", gpu="0", **vllm) == 87
    assert s.value("gpu_memory_used_bytes", gpu="0", **vllm) == 60 * GIB
    assert s.value("gpu_allocation_info", gpu="0", **vllm) == 1
    assert s.find("gpu_info", gpu="0")[0][0]["pod"] == "vllm-0"

    # shared GPU: both pods in the allocation series, neither stamped on the GPU's own series
    assert s.value("gpu_allocation_info", gpu="1", pod="job-a", container="worker") == 1
    assert s.value("gpu_allocation_info", gpu="1", pod="job-b", container="worker") == 1
    labels, value = s.find("gpu_utilization_percent", gpu="1")[0]
    assert "pod" not in labels and value == 12

    # MIG series carry the pod that holds that instance
    assert (
        s.value("gpu_mig_memory_used_bytes", mig_uuid=MIG1, pod="notebook", container="lab") == GIB
    )
    assert (
        s.value("gpu_mig_memory_used_bytes", mig_uuid="MIG-cccc-2", container="sidecar") == 2 * GIB
    )
    assert s.value("gpu_allocation_info", gpu="2", mig_uuid=MIG1, pod="notebook") == 1
    assert "pod" not in s.find("gpu_utilization_percent", gpu="2")[0][0]

    # an unallocated GPU has no pod labels at all
    assert "pod" not in s.find("gpu_utilization_percent", gpu="3")[0][0]
    assert not s.has("gpu_allocation_info", gpu="3")
    assert s.value("gpu_exporter_podresources_up") == 1
    assert s.value("gpu_exporter_podresources_errors_total") == 0
    assert 0 < s.value("gpu_exporter_podresources_duration_seconds") < 1


def test_kubelet_failure_drops_pod_labels_not_the_scrape(
    scenario: Scenario, start_exporter, kubelet
) -> None:
    kubelet.pod("inference", "vllm-0", {"server": [scenario.gpus[0]["uuid"]]})
    exp = start_exporter(scenario, pod_socket=str(kubelet.socket_path))
    exp.wait_scrape(lambda s: s.has("gpu_utilization_percent", gpu="0", pod="vllm-0"))

    kubelet.stop()
    kubelet.socket_path.unlink(missing_ok=True)
    s = exp.wait_scrape(lambda s: s.value("gpu_exporter_podresources_up") == 0)
    s = exp.wait_scrape(lambda s: not s.has("gpu_allocation_info"))
    labels, value = s.find("gpu_utilization_percent", gpu="0")[0]
    assert "pod" not in labels and value == 87
    assert s.value("gpu_exporter_podresources_errors_total") >= 1
    assert "pod-resources unavailable, pod labels dropped" in exp.output()


def test_missing_socket_is_not_fatal(scenario: Scenario, start_exporter) -> None:
    exp = start_exporter(scenario, pod_socket="/nonexistent/kubelet.sock")
    s = exp.wait_collects(3)
    assert s.value("gpu_exporter_podresources_up") == 0
    assert s.value("gpu_utilization_percent", gpu="0") == 87
    assert exp.output().count("pod-resources unavailable") == 1
