"""The CRDs as they ship (charts/tollgate/crds): structure, and what they accept and reject.

No API server validates here: crd_validation checks the openAPIV3Schema with jsonschema and
evaluates the CEL rules with a real CEL implementation (cel-python), as the emulator does
on every write.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import crd_validation
import pytest
import yaml
from harness import Kube
from k8s_emulator import CRD_DIR, INFERENCE_POOL_CRD, EmulatorThread

from tollgate_contract.config import Policy
from tollgate_operator.configdoc import POLICY_FIELDS, PolicyView

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CRDS = {
    doc["spec"]["names"]["kind"]: doc
    for doc in (yaml.safe_load(p.read_text()) for p in sorted(CRD_DIR.glob("*.yaml")))
}


def _schema(kind: str) -> dict[str, Any]:
    return CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(obj: dict[str, Any]) -> list[str]:
    """Every problem the API server would report, as readable lines."""
    return crd_validation.validate(_schema(obj["kind"]), obj)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_cel_rule_compiles(kind: str) -> None:
    rules = crd_validation.cel_rules(_schema(kind))
    assert rules, kind
    for rule in rules:
        crd_validation.compile_rule(rule)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_is_complete(kind: str) -> None:
    crd = CRDS[kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.tollgate.dev"
    assert spec["group"] == "tollgate.dev" and spec["scope"] == "Namespaced"
    assert "tollgate" in spec["names"]["categories"]
    assert spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[-1] == "Age"
    conditions = _schema(kind)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) == {"type", "status"}


def test_printer_columns_as_specified() -> None:
    def cols(kind: str) -> set[str]:
        return {c["name"] for c in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]}

    assert {"Gateway", "Policy", "Ready", "Tokens Today", "Age"} <= cols("ApiKey")
    assert {"Tokens/Day", "RPM", "TPM", "Keys", "Age"} <= cols("QuotaPolicy")
    assert {"Upstream", "Replicas", "Ready", "Keys", "Age"} <= cols("InferenceGateway")
    assert {"Node Selector", "Ready", "Age"} <= cols("GPUExporter")


def _structural(schema: dict[str, Any], where: str = "") -> list[str]:
    """The structural-schema rules the API server enforces on CRDs."""
    problems = []
    untyped = "type" not in schema and not schema.get("x-kubernetes-int-or-string")
    if untyped and not schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{where}: no type")
    for branch in schema.get("anyOf", []):
        if set(branch) - {"type"} or not schema.get("x-kubernetes-int-or-string"):
            problems.append(f"{where}: anyOf only for int-or-string")
    for key, sub in schema.get("properties", {}).items():
        problems += _structural(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), dict):
        problems += _structural(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += _structural(schema["additionalProperties"], f"{where}{{}}")
    return problems


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_schema_is_structural(kind: str) -> None:
    assert _structural(_schema(kind)) == []


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert validate(doc) == [], path


def test_one_example_per_kind() -> None:
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in EXAMPLES.glob("*.yaml")}
    assert kinds == set(CRDS)


def _example(kind: str) -> dict[str, Any]:
    for path in EXAMPLES.glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if doc["kind"] == kind:
            return doc
    raise LookupError(kind)


def _with(kind: str, dotted: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(_example(kind))
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


_DELETE = object()

BAD = [
    ("ApiKey", "spec.gateway", _DELETE, "'gateway' is a required property"),
    ("ApiKey", "spec.gateway", "Not_A_Name", "does not match"),
    ("ApiKey", "spec.expiresAt", "next tuesday", "is not a 'date-time'"),
    ("ApiKey", "spec.disabled", "yes", "is not of type 'boolean'"),
    ("ApiKey", "spec.models", [], None),  # an empty list is allowed: no model at all
    ("ApiKey", "spec.rotation", {"id": "r1"}, "'previousValidUntil' is a required property"),
    ("ApiKey", "metadata.name", "k" * 64, "at most 63 characters"),
    ("ApiKey", "spec.secretRef", {"key": "x"}, "'name' is a required property"),
    ("QuotaPolicy", "spec.tokensPerDay", 0, "less than the minimum of 1"),
    ("QuotaPolicy", "spec.requestsPerMinute", "600", "is not of type 'integer'"),
    ("QuotaPolicy", "spec", {}, "at least one limit"),
    ("InferenceGateway", "spec.upstream", _DELETE, "'upstream' is a required property"),
    ("InferenceGateway", "spec.upstream.url", "vllm:8000", "does not match"),
    ("InferenceGateway", "spec.upstream", {}, "exactly one of url, urls, dnsName or inferencePool"),
    (
        "InferenceGateway",
        "spec.upstream",
        {"url": "http://vllm:8000", "dnsName": "vllm-headless:8000"},
        "exactly one of url, urls, dnsName or inferencePool",
    ),
    ("InferenceGateway", "spec.upstream.dnsName", "vllm-headless", "does not match"),
    ("InferenceGateway", "spec.upstream", {"inferencePool": {"name": "vllm"}}, None),
    ("InferenceGateway", "spec.upstream", {"inferencePool": {}}, "'name' is a required"),
    ("InferenceGateway", "spec.upstream", {"inferencePool": {"name": "V_1"}}, "does not match"),
    ("InferenceGateway", "spec.upstream.urls", [], "should be non-empty"),
    ("InferenceGateway", "spec.service", {"type": "ExternalName"}, "is not one of"),
    ("InferenceGateway", "spec.imagePullSecrets", [{"nam": "x"}], "'name' is a required"),
    ("InferenceGateway", "spec.replicas", -1, "less than the minimum of 0"),
    ("InferenceGateway", "spec.drainSeconds", 0, "less than the minimum of 1"),
    ("InferenceGateway", "spec.podDisruptionBudget", {"maxUnavailable": "half"}, "percentage"),
    ("InferenceGateway", "spec.resources", {"requests": {"cpu": "lots"}}, "does not match"),
    ("InferenceGateway", "spec.imagePullPolicy", "Sometimes", "is not one of"),
    ("GPUExporter", "spec.intervalSeconds", 0.1, "less than the minimum of 0.5"),
    ("GPUExporter", "spec.tolerations", [{"effect": "Maybe"}], "is not one of"),
    ("GPUExporter", "spec.podResources", {"hostPath": "relative/dir"}, "does not match"),
]


@pytest.mark.parametrize(("kind", "field", "value", "message"), BAD, ids=lambda v: str(v)[:30])
def test_bad_objects_are_rejected_with_a_useful_message(
    kind: str, field: str, value: Any, message: str | None
) -> None:
    errors = validate(_with(kind, field, value))
    if message is None:
        assert errors == []
    else:
        assert any(message in e for e in errors), errors


def _undescribed(schema: dict[str, Any], path: str) -> list[str]:
    missing = []
    for key, sub in (schema.get("properties") or {}).items():
        where = f"{path}.{key}"
        if "description" not in sub:
            missing.append(where)
        missing += _undescribed(sub, where)
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), dict):
            missing += _undescribed(schema[key], path + suffix)
    return missing


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_spec_field_is_described(kind: str) -> None:
    """`kubectl explain <kind>.spec` shows a sentence for every field."""
    assert _undescribed(_schema(kind)["properties"]["spec"], "spec") == []


@pytest.mark.parametrize("kind", ["InferenceGateway", "GPUExporter"])
@pytest.mark.parametrize("name", ["gw.prod", "1gw", "GW"])
def test_names_that_become_service_names_are_dns_1035_labels(kind: str, name: str) -> None:
    obj = {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "llm"},
        "spec": {"upstream": {"url": "http://vllm:8000"}} if kind == "InferenceGateway" else {},
    }
    assert any("DNS-1035" in e for e in validate(obj)), validate(obj)
    obj["metadata"]["name"] = "gw-prod"
    assert validate(obj) == []


def test_the_scale_subresource_serves_an_hpa() -> None:
    scale = CRDS["InferenceGateway"]["spec"]["versions"][0]["subresources"]["scale"]
    assert scale["labelSelectorPath"] == ".status.selector"
    status = _schema("InferenceGateway")["properties"]["status"]["properties"]
    assert status["selector"]["type"] == "string"


# ---- the upstream forms --------------------------------------------------------------------

UPSTREAM_FORMS = {
    "url": "http://vllm:8000",
    "urls": ["http://vllm-0:8000", "http://vllm-1:8000"],
    "dnsName": "vllm-headless:8000",
    "inferencePool": {"name": "vllm"},
}


@pytest.mark.parametrize(
    "forms",
    [c for n in range(len(UPSTREAM_FORMS) + 1) for c in itertools.combinations(UPSTREAM_FORMS, n)],
    ids=lambda c: "+".join(c) or "none",
)
def test_exactly_one_upstream_form_is_accepted(forms: tuple[str, ...]) -> None:
    upstream = {form: UPSTREAM_FORMS[form] for form in forms}
    errors = validate(_with("InferenceGateway", "spec.upstream", upstream))
    if len(forms) == 1:
        assert errors == []
    else:
        assert any("exactly one of url, urls, dnsName or inferencePool" in e for e in errors)


# ---- the InferencePool CRD the tests install (third-party: never in the chart) -------------

POOL_CRD = yaml.safe_load(INFERENCE_POOL_CRD.read_text())
POOL_SCHEMA = POOL_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _pool(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "vllm-epp", "port": {"number": 9002}},
    }
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "vllm", "namespace": "llm"},
        "spec": {**base, **spec},
    }


def test_the_inference_pool_crd_is_not_shipped_and_is_structural() -> None:
    assert POOL_CRD["metadata"]["name"] == "inferencepools.inference.networking.k8s.io"
    assert POOL_CRD["spec"]["group"] not in {c["spec"]["group"] for c in CRDS.values()}
    assert not list(CRD_DIR.glob("*inference.networking*"))
    assert _structural(POOL_SCHEMA) == []
    for rule in crd_validation.cel_rules(POOL_SCHEMA):
        crd_validation.compile_rule(rule)


POOL_BAD = [
    ({}, None),
    ({"appProtocol": "kubernetes.io/h2c"}, None),
    ({"targetPorts": [{"number": p} for p in range(8000, 8008)]}, None),
    ({"targetPorts": [{"number": p} for p in range(8000, 8009)]}, "is too long"),
    ({"targetPorts": []}, "should be non-empty"),
    ({"targetPorts": [{"number": 8000}, {"number": 8000}]}, "port number must be unique"),
    ({"targetPorts": [{"number": 0}]}, "less than the minimum of 1"),
    ({"appProtocol": "grpc"}, "is not one of"),
    ({"selector": {}}, "'matchLabels' is a required property"),
    ({"endpointPickerRef": {"name": "epp"}}, "port is required when kind is 'Service'"),
    ({"endpointPickerRef": {"name": "epp", "kind": "Pod"}}, None),
]


@pytest.mark.parametrize(("spec", "message"), POOL_BAD, ids=lambda v: str(v)[:40])
def test_inference_pool_validation(spec: dict[str, Any], message: str | None) -> None:
    errors = crd_validation.validate(POOL_SCHEMA, _pool(**spec))
    if message is None:
        assert errors == []
    else:
        assert any(message in e for e in errors), errors


def test_the_emulator_enforces_the_inference_pool_schema() -> None:
    with EmulatorThread(inference_pool=True) as cluster:
        cluster.create_namespaces("llm")
        kube = Kube(cluster.url)
        bad = _pool(targetPorts=[{"number": 8000}, {"number": 8000}])
        response = kube.http.post(
            "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools", json=bad
        )
        assert response.status_code == 422, response.text
        assert "port number must be unique" in response.json()["message"]
        assert kube.apply(_pool())["metadata"]["uid"]


def test_a_quota_policy_carries_every_field_of_the_contracts_policy() -> None:
    """What a QuotaPolicy can say is what the config document's Policy holds: a field only
    the gateway knows (priority was one) is a setting nobody on a cluster can make."""
    spec = _schema("QuotaPolicy")["properties"]["spec"]["properties"]
    contract = {f.alias for f in Policy.model_fields.values()}
    assert set(spec) == contract
    assert set(POLICY_FIELDS) == contract
    got = _with("QuotaPolicy", "spec", {"priority": -1})
    assert validate(got) == []  # a sheddable class needs no limit
    assert PolicyView.from_body(got).to_policy().priority == -1
