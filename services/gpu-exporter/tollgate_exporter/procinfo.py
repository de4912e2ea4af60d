"""Which pod a GPU process belongs to, from its cgroup: for GPUs shared by several pods.

The kubelet's pod-resources API says which containers hold a GPU but not which of them runs
a given pid. The pid's cgroup path names its pod UID and container ID under both cgroup
drivers (`.../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope` with systemd,
`/kubepods/burstable/pod<uid>/<id>` with cgroupfs), which join to kube-state-metrics'
`kube_pod_info{uid}` and `kube_pod_container_info{container_id}`. Readable only when the
exporter shares the host's PID namespace (`hostPID: true`); otherwise NVML's pids are not
this namespace's and nothing is added.
"""

from __future__ import annotations

import re

_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")


def parse_cgroup(text: str) -> dict[str, str]:
    """`pod_uid` and `container_id` from /proc/<pid>/cgroup text; empty when not a pod's."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1].strip()
        uid = _POD_UID.search(path)
        if uid is None:
            continue
        labels = {"pod_uid": uid.group(1).replace("_", "-")}
        container = _CONTAINER_ID.search(path)
        if container is not None:
            labels["container_id"] = container.group(1)
        return labels
    return {}


def cgroup_labels(pid: int, proc: str = "/proc") -> dict[str, str]:
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            return parse_cgroup(f.read())
    except OSError:  # another PID namespace, or the process has exited
        return {}
