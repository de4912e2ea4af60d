"""The operator and the gateway agree through tollgate_contract only: every env name the
contract lists is a setting of the gateway, and the Deployment the operator renders sets no
env name outside the contract."""

from __future__ import annotations

from typing import Any

from tollgate_contract import env
from tollgate_contract.config import CONFIG_SECRET_KEY
from tollgate_gateway.settings import Settings
from tollgate_operator import children


def _gateway(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "gw", "namespace": "llm", "uid": "u-1"},
        "spec": {"upstream": {"url": "http://vllm:8000"}, **spec},
    }


def test_every_contract_env_name_is_a_gateway_setting() -> None:
    fields = {name.lower() for name in Settings.model_fields}
    missing = sorted(name for name in env.ALL if name.lower() not in fields)
    assert missing == [], f"contract env names the gateway does not read: {missing}"


def test_the_operator_sets_only_contract_env_names() -> None:
    specs = [
        _gateway(),
        _gateway(
            upstream={
                "urls": ["http://a:8000"],
                "sessionAffinity": "key",
                "apiKeySecretRef": {"name": "vllm"},
            },
            servedModelName="m",
            database={"urlSecretRef": {"name": "db"}},
        ),
        _gateway(upstream={"dnsName": "vllm-headless:8000"}),
    ]
    seen: set[str] = set()
    for gw in specs:
        (container,) = children.gateway_deployment(gw)["spec"]["template"]["spec"]["containers"]
        names = {e["name"] for e in container["env"]}
        assert names <= env.ALL, sorted(names - env.ALL)
        seen |= names
    # Every variable the contract lists for the operator to set is set by some spec.
    assert seen == env.ALL - {env.QUOTA_DB_SCHEMA}


def test_an_inference_pool_upstream_sets_no_upstream_env() -> None:
    """The document's `upstreams` name the replicas; an env URL beside them would only be
    a second, stale answer (the gateway's own default VLLM_URL is replaced by them)."""
    gw = _gateway(upstream={"inferencePool": {"name": "vllm"}, "sessionAffinity": "header"})
    (container,) = children.gateway_deployment(gw)["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container["env"]}
    assert not names & {env.VLLM_URL, env.VLLM_URLS, env.VLLM_DNS_NAME}
    assert env.GATEWAY_SESSION_AFFINITY in names and names <= env.ALL


def test_config_secret_uses_the_contract_key() -> None:
    secret = children.config_secret(_gateway(), b"{}", "v1")
    assert list(secret["data"]) == [CONFIG_SECRET_KEY]
    (container,) = children.gateway_deployment(_gateway())["spec"]["template"]["spec"]["containers"]
    config_file = {e["name"]: e.get("value") for e in container["env"]}[env.GATEWAY_CONFIG_FILE]
    assert config_file.endswith("/" + CONFIG_SECRET_KEY)
