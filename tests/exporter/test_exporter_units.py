"""Fast in-process checks: the hand protobuf decoder, exposition format, the collector's failure
policy over the pure-Python fake, and the `--fake-gpus` demo mode over HTTP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Scrape
from hypothesis import given
from hypothesis import strategies as st

from tollgate_exporter import metrics, probes
from tollgate_exporter.collector import Collector
from tollgate_exporter.exposition import SampleSet
from tollgate_exporter.fake import FakeBinding
from tollgate_exporter.nvml import Nvml
from tollgate_exporter.podresources import build_map, decode_list_response, normalize_device_id
from tollgate_exporter.procinfo import parse_cgroup

REPO = Path(__file__).resolve().parents[2]

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(
    pods=st.lists(
        st.tuples(
            names, names, st.lists(st.tuples(names, st.lists(names, max_size=4)), max_size=3)
        ),
        max_size=4,
    )
)
def test_hand_decoder_matches_protobuf(podresources_pb: tuple[Any, Any], pods: list) -> None:
    pb, _ = podresources_pb
    msg = pb.ListPodResourcesResponse(
        pod_resources=[
            pb.PodResources(
                name=name,
                namespace=ns,
                containers=[
                    pb.ContainerResources(
                        name=cname,
                        devices=[
                            pb.ContainerDevices(
                                resource_name="nvidia.com/gpu",
                                device_ids=ids,
                                topology=pb.TopologyInfo(nodes=[pb.NUMANode(ID=-1)]),
                            )
                        ],
                        cpu_ids=[1, 2**40],
                        memory=[pb.ContainerMemory(memory_type="hugepages-2Mi", size=2**33)],
                        dynamic_resources=[pb.DynamicResource(claim_name="c")],
                    )
                    for cname, ids in containers
                ],
            )
            for name, ns, containers in pods
        ]
    )
    expected = [
        (ns, name, cname, [("nvidia.com/gpu", i) for i in ids])
        for name, ns, cs in pods
        for cname, ids in cs
    ]
    assert decode_list_response(msg.SerializeToString()) == expected


def test_device_id_normalisation() -> None:
    gpu = "nvidia.com/gpu"
    assert normalize_device_id(gpu, "GPU-abc::7") == "GPU-abc"
    assert normalize_device_id("nvidia.com/mig-1g.10gb", "MIG-abc-def") == "MIG-abc-def"
    assert normalize_device_id("nvidia.com/mig-3g.40gb", "MIG-GPU-0a1b-2c/3/0") == (
        "GPU-0a1b-2c/3/0"
    )
    # the device plugin's index ids, GKE's nvidiaN, a renamed shared resource
    assert normalize_device_id(gpu, "3") == "index:3"
    assert normalize_device_id(gpu, "3::1") == "index:3"
    assert normalize_device_id(gpu, "nvidia4") == "index:4"
    assert normalize_device_id("nvidia.com/gpu.shared", "GPU-abc::2") == "GPU-abc"
    # another vendor's device "0" is not GPU 0
    assert normalize_device_id("example.com/nic", "0") is None
    assert normalize_device_id("amd.com/gpu", "GPU-abc") is None
    devices = [(gpu, "GPU-x::1"), (gpu, "GPU-x::2"), ("example.com/nic", "0")]
    assert build_map([("ns", "p", "c", devices)]) == {"GPU-x": [("ns", "p", "c")]}


def test_exposition_escaping_and_undeclared_names() -> None:
    ss = SampleSet()
    ss.add("gpu_info", {"model": 'a "quoted"\\name\nnext'}, 1)
    ss.add("gpu_power_watts", {"gpu": "0"}, 12.5)
    text = ss.render().decode()
    assert 'model="a \\"quoted\\"\\\\name\\nnext"' in text
    assert Scrape.parse(text).value("gpu_info") == 1
    with pytest.raises(KeyError):
        ss.add("gpu_typo_percent", {}, 1)


def test_a_failing_probe_costs_only_its_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(nv: Nvml, h: Any):
        raise ZeroDivisionError("bad transformation")
        yield  # pragma: no cover

    monkeypatch.setattr(probes, "PROBES", (("broken", broken), *probes.PROBES))
    c = Collector(Nvml(FakeBinding(2)), node="n1")
    try:
        c.collect_once()
        s = Scrape.parse(c.collect_once().body.decode())
    finally:
        c.stop()
    assert s.value("gpu_exporter_nvml_errors_total", call="broken") == 4
    assert len(s.find("gpu_utilization_percent")) == 2
    assert s.value("gpu_exporter_nvml_up") == 1


def test_every_metric_is_documented() -> None:
    doc = (REPO / "docs" / "gpu-exporter.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)`", doc, flags=re.M))
    assert documented == set(metrics.SPECS)


def test_fake_gpus_mode_over_http(start_exporter) -> None:
    exp = start_exporter(None, "--fake-gpus", "8")
    s = exp.wait_collects(2)
    assert s.value("gpu_exporter_gpus") == 8
    assert len(s.find("gpu_utilization_percent")) == 8
    assert len({lab["uuid"] for lab, _ in s.find("gpu_info")}) == 8
    for _, v in s.find("gpu_temperature_celsius"):
        assert 30 <= v <= 80


def test_pod_of_a_process_from_its_cgroup() -> None:
    """The kubelet's two cgroup layouts (systemd and cgroupfs drivers, v2 and v1)."""
    uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    cid = "ab" * 32
    systemd = (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n"
    )
    cgroupfs = f"12:memory:/kubepods/besteffort/pod{uid}/{cid}\n11:cpu:/kubepods\n"
    for text in (systemd, cgroupfs):
        assert parse_cgroup(text) == {"pod_uid": uid, "container_id": cid}, text
    assert parse_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n") == {}
    assert parse_cgroup("4:memory:/process_api/de34822264d7d56b0f1bd7dbc1013641\n") == {}
