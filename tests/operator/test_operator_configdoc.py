"""The config decision as a pure function: who is in, who is out, and why."""

from __future__ import annotations

import datetime

from tollgate_contract.config import parse
from tollgate_contract.keys import key_hash as sha256
from tollgate_operator.configdoc import ApiKeyView, GatewayView, PolicyView, build
from tollgate_operator.keys import Material, MaterialError

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
GW = GatewayView("ns", "gw", "uid-gw", default_policy="std", has_database=False)
POLICIES = {"std": PolicyView("ns", "std", (("tokensPerDay", 100),), deleting=False)}


def key(name: str, **spec: object) -> ApiKeyView:
    body = {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"}, "spec": spec}
    return ApiKeyView.from_body({**body, "spec": {"gateway": "gw", **spec}})


def material(name: str, previous: str | None = None) -> Material:
    return Material(sha256(f"sk-{name}-0123456789"), sha256(previous) if previous else None, "s")


def test_fail_closed_verdicts() -> None:
    keys = [
        key("ok"),
        key("off", disabled=True),
        key("old", expiresAt="2026-01-01T00:00:00Z"),
        key("nopolicy", policy="gold"),
        key("nosecret"),
        key("weak"),
        key("twin"),
    ]
    materials = {f"uid-{k.name}": material(k.name) for k in keys}
    materials.pop("uid-nosecret")
    materials["uid-weak"] = MaterialError("WeakKey", "too short")
    materials["uid-twin"] = material("ok")
    built = build(GW, keys, POLICIES, materials, NOW)
    reasons = {name: v.reason for name, v in built.verdicts.items()}
    assert reasons == {
        "ok": "Active",
        "off": "Disabled",
        "old": "Expired",
        "nopolicy": "PolicyMissing",
        "nosecret": "SecretMissing",
        "weak": "WeakKey",
        "twin": "DuplicateKey",
    }
    assert [k.name for k in built.config.keys.values()] == ["ok"]
    assert built.config.keys[material("ok").hash].policy == "std"
    assert parse(built.config.to_json()) == built.config


def test_same_inputs_same_bytes_and_next_deadline() -> None:
    keys = [key("b", expiresAt="2026-07-01T00:00:00Z"), key("a")]
    materials = {"uid-a": material("a"), "uid-b": material("b")}
    one = build(GW, keys, POLICIES, materials, NOW)
    two = build(GW, list(reversed(keys)), POLICIES, materials, NOW)
    assert one.config.to_json() == two.config.to_json()
    assert one.config.version() == two.config.version()
    assert one.next_change == datetime.datetime(2026, 7, 1, tzinfo=datetime.UTC)


def test_rotation_window() -> None:
    rotating = key("r", rotation={"id": "1", "previousValidUntil": "2026-06-02T00:00:00Z"})
    materials = {"uid-r": material("r", previous="sk-r-old-0123456789")}
    entry = next(iter(build(GW, [rotating], POLICIES, materials, NOW).config.keys.values()))
    assert entry.previous_hash == sha256("sk-r-old-0123456789")
    later = NOW + datetime.timedelta(days=2)
    entry = next(iter(build(GW, [rotating], POLICIES, materials, later).config.keys.values()))
    assert entry.previous_hash is None
