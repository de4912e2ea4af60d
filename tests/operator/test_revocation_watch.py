"""Revocation in seconds without the kubelet: the gateway watches its config Secret through
the (emulated) Kubernetes API, `GATEWAY_CONFIG_SECRET`, with no mounted file at all.

Operator and gateway are real processes; the API is the fixed-up kmock emulator. Bound
asserted: ApiKey deleted -> 401 on every replica within 5 s (the operator writes the config
within ~1 s; the watch delivers it at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import Kube, Operator, wait_until
from k8s_emulator import EmulatorThread
from servers import Gateway, Sim
from test_operator_reconcile import CONFIG, GW, NS, apikey, gateway

REVOCATION_BOUND_S = 5.0


def _status(gw: Gateway, key: str) -> int:
    r = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    return r.status_code


def test_deleted_key_is_refused_within_seconds_on_every_replica(
    cluster: EmulatorThread,
    kube: Kube,
    operator: Operator,
    make_sim: Callable[..., Sim],
    tmp_path: Path,
) -> None:
    kube.apply(gateway())
    kube.apply(apikey("team-a"))
    key = wait_until(lambda: kube.secret_data(NS, "team-a-key", "key"))
    wait_until(lambda: (kube.secret_data(NS, CONFIG, "config.json") or "").count("team-a"))

    # The gateway pods' ServiceAccount token: its reads are authorized by the Role the
    # operator made (get and watch on the one config Secret), as on a real cluster.
    wait_until(lambda: kube.get("RoleBinding", NS, f"{GW}-gateway"), what="the gateway's Role")
    token_file = tmp_path / "token"
    token_file.write_text(cluster.service_account_token(NS, f"{GW}-gateway"))
    env = {
        "GATEWAY_API_KEYS": "",
        "GATEWAY_CONFIG_SECRET": f"{NS}/{CONFIG}",
        "GATEWAY_KUBE_API_URL": cluster.url,
        "GATEWAY_KUBE_TOKEN_FILE": str(token_file),
    }
    upstream = make_sim()
    replicas = [Gateway(tmp_path, upstream.url, env) for _ in range(2)]
    try:
        # The document was read through the API at start: the key works at once.
        assert all(_status(gw, key) == 200 for gw in replicas)

        kube.apply(apikey("team-b"))
        other = wait_until(lambda: kube.secret_data(NS, "team-b-key", "key"))
        wait_until(
            lambda: all(_status(gw, other) == 200 for gw in replicas), timeout=REVOCATION_BOUND_S
        )

        started = time.monotonic()
        kube.delete("ApiKey", NS, "team-a")
        wait_until(
            lambda: all(_status(gw, key) == 401 for gw in replicas), timeout=REVOCATION_BOUND_S
        )
        assert time.monotonic() - started < REVOCATION_BOUND_S
        assert all(_status(gw, other) == 200 for gw in replicas)
        for gw in replicas:
            sources = [e.get("source") for e in gw.lines() if e.get("event") == "config_reload"]
            assert sources and set(sources) == {"secret"}
    finally:
        for gw in replicas:
            gw.stop()
