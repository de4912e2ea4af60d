"""Which pod holds which GPU, from the kubelet's pod-resources v1 gRPC API.

The response is decoded by hand (`decode_list_response`): the exporter needs six string
fields from a stable v1 message, and a hand decoder spares a protobuf runtime, generated
stubs and the protobuf/grpcio version lock-step. The test suite checks it against messages
encoded by the real protobuf library from the kubelet's schema, served by a real gRPC server.

The kubelet is asked from a background thread with a deadline and backoff; the collector only
reads the last good map, so a missing or hung socket drops pod labels, never the scrape.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from .exposition import SampleSet

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"
# A node with hundreds of pods can exceed gRPC's 4 MiB default; the kubelet itself allows 16.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024

Owner = tuple[str, str, str]  # namespace, pod, container
Device = tuple[str, str]  # resource name, device id
Entry = tuple[str, str, str, list[Device]]  # namespace, pod, container, devices

_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9a-fA-F-]+)/(\d+)/(\d+)$")
# The NVIDIA device plugin names GPUs by UUID, or by index with DEVICE_ID_STRATEGY=index;
# GKE's plugin names them nvidia0, nvidia1, ...
_INDEX = re.compile(r"^(?:nvidia)?(\d+)$")
# nvidia.com/gpu, nvidia.com/gpu.shared (renamed time-sliced replicas), nvidia.com/mig-1g.10gb
_NVIDIA_RESOURCE = re.compile(r"^nvidia\.com/(?:gpu(?:\.[\w.-]+)?|mig-[\w.+-]+)$")


# --- protobuf wire format -----------------------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) for each field; unknown wire types skip cleanly, so fields the
    kubelet adds later (topology, CPU ids, dynamic resources) are ignored."""
    i, n = 0, len(buf)
    value: Any
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i : i + length], i + length
            if i > n:
                raise ValueError("truncated field")
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def decode_list_response(buf: bytes) -> list[Entry]:
    """ListPodResourcesResponse -> [(namespace, pod, container, [(resource, device id)])]."""
    out = []
    for number, pod_bytes in _fields(buf):
        if number != 1:  # pod_resources
            continue
        name = namespace = ""
        containers: list[bytes] = []
        for pn, pv in _fields(pod_bytes):
            if pn == 1:
                name = pv.decode()
            elif pn == 2:
                namespace = pv.decode()
            elif pn == 3:
                containers.append(pv)
        for container_bytes in containers:
            cname = ""
            devices: list[Device] = []
            for cn, cv in _fields(container_bytes):
                if cn == 1:
                    cname = cv.decode()
                elif cn == 2:  # ContainerDevices: resource_name = 1, device_ids = 2
                    resource = ""
                    ids: list[str] = []
                    for dn, dv in _fields(cv):
                        if dn == 1:
                            resource = dv.decode()
                        elif dn == 2:
                            ids.append(dv.decode())
                    devices.extend((resource, i) for i in ids)
            out.append((namespace, name, cname, devices))
    return out


def index_key(index: int) -> str:
    """The map key for a GPU allocated by index ("3", GKE's "nvidia3")."""
    return f"index:{index}"


def normalize_device_id(resource: str, device_id: str) -> str | None:
    """Map a device-plugin id to the key the collector looks up; None for other resources.

    Only NVIDIA's resources count (a NIC or an FPGA also has device "0"). `GPU-x::3`
    (time-sliced replica 3) -> `GPU-x`; `3` and `nvidia3` -> `index:3`; `MIG-GPU-x/1/0`
    (older MIG naming) -> `GPU-x/1/0`; `MIG-<uuid>` and GPU UUIDs stay as they are.
    """
    if not _NVIDIA_RESOURCE.match(resource):
        return None
    device_id = device_id.split("::", 1)[0]
    legacy = _LEGACY_MIG.match(device_id)
    if legacy:
        return f"{legacy[1]}/{legacy[2]}/{legacy[3]}"
    index = _INDEX.match(device_id)
    if index:
        return index_key(int(index[1]))
    return device_id


def build_map(entries: list[Entry]) -> dict[str, list[Owner]]:
    out: dict[str, list[Owner]] = {}
    for namespace, pod, container, devices in entries:
        for resource, raw in devices:
            key = normalize_device_id(resource, raw)
            if key is None:
                continue
            owners = out.setdefault(key, [])
            owner = (namespace, pod, container)
            if owner not in owners:
                owners.append(owner)
    return out


# --- client -------------------------------------------------------------------------------
class PodResources:
    """Refreshes the device -> owners map in the background; `current()` never blocks."""

    def __init__(self, socket_path: str, interval: float = 10.0, timeout: float = 5.0) -> None:
        self._path = socket_path
        self._interval = interval
        self._timeout = timeout
        self._map: dict[str, list[Owner]] = {}
        self._up = False
        self._errors = 0
        self._duration = 0.0
        self._channel: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-resources", daemon=True)
        self._last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._timeout + 1)
        if self._channel is not None:
            self._channel.close()

    def current(self) -> dict[str, list[Owner]]:
        return self._map

    def self_metrics(self, ss: SampleSet) -> None:
        ss.add("gpu_exporter_podresources_up", {}, 1 if self._up else 0)
        ss.add("gpu_exporter_podresources_errors_total", {}, self._errors)
        ss.add("gpu_exporter_podresources_duration_seconds", {}, round(self._duration, 6))

    def refresh(self) -> None:
        """One List call; on failure the old map is dropped, since it may name dead pods."""
        started = time.perf_counter()
        try:
            entries = self._list()
        except Exception as exc:
            self._duration = time.perf_counter() - started
            self._errors += 1
            self._up = False
            self._map = {}
            self._reset_channel()
            message = _short(exc)
            if message != self._last_error:
                log.warning("kubelet pod-resources unavailable, pod labels dropped: %s", message)
            self._last_error = message
            raise
        self._duration = time.perf_counter() - started
        self._map = build_map(entries)
        if not self._up:
            log.info("kubelet pod-resources answering (%d containers)", len(entries))
        self._up = True
        self._last_error = ""

    def _list(self) -> list[Entry]:
        if not os.path.exists(self._path):
            raise FileNotFoundError(f"{self._path} does not exist")
        if self._channel is None:
            import grpc  # imported on first use: nodes without the socket never pay its RSS

            self._channel = grpc.insecure_channel(
                f"unix://{self._path}",
                options=[
                    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                    ("grpc.enable_http_proxy", 0),
                ],
            )
        rpc = self._channel.unary_unary(
            LIST_METHOD,
            request_serializer=lambda _request: b"",
            response_deserializer=decode_list_response,
        )
        entries: list[Entry] = rpc(None, timeout=self._timeout)
        return entries

    def _reset_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _run(self) -> None:
        backoff = self._interval
        while not self._stop.is_set():
            try:
                self.refresh()
                backoff = self._interval
            except Exception:
                # Exponential backoff to a minute: a kubelet restart is not hammered.
                backoff = min(max(backoff * 2, self._interval), 60.0)
                self._stop.wait(backoff)
                continue
            self._stop.wait(self._interval)


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        try:
            return f"{exc.code().name}: {details()}"  # type: ignore[attr-defined]
        except Exception:
            pass
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
