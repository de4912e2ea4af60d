"""Every rendered object is checked against the schema an API server would use for it:

- built-in kinds with kubernetes-validate --strict (unknown fields rejected) against the
  oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest schemas the
  validator ships (the claim has no upper bound);
- tollgate.dev custom resources against their CRD's openAPIV3Schema (the operator tests'
  validator, CEL rules included), plus unknown fields, which the API server would prune;
- ServiceMonitors and PrometheusRules against the prometheus-operator models (cloudcoil),
  and the rules' PromQL with promtool.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import yaml
from chart_support import CHART, Manifest, crds, of_kind, render
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from test_chart_render import MATRIX
from test_operator_crds import validate as validate_custom_resource

# kubernetes-validate re-reads its (large) schema files for every object: cache them.
kv_utils.schema_contents = functools.cache(kv_utils.schema_contents)

OLDEST = "1.29.0"
NEWEST = kubernetes_validate.latest_version()
CUSTOM_GROUPS = ("tollgate.dev/", "monitoring.coreos.com/")


def _all_objects() -> list[tuple[str, Manifest]]:
    """Every distinct object over the whole matrix (case name kept for messages)."""
    seen: set[str] = set()
    objects = []
    for case, values in sorted(MATRIX.items()):
        for doc in render(values):
            if doc["kind"] == "Secret":
                doc.pop("data", None)  # generated passwords differ per render
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                objects.append((case, doc))
    return objects


OBJECTS = _all_objects()
BUILTIN = [(c, d) for c, d in OBJECTS if not d["apiVersion"].startswith(CUSTOM_GROUPS)]


def test_the_claimed_range_is_the_one_validated() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={OLDEST}-0"
    assert tuple(int(x) for x in NEWEST.split(".")[:2]) >= (1, 35), NEWEST


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_builtin_objects_validate_strictly(version: str) -> None:
    kinds = set()
    problems = []
    for case, doc in BUILTIN:
        kinds.add(doc["kind"])
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(
                f"[{case}] {doc['kind']}/{doc['metadata']['name']} {path}: {error.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"[{case}] no schema: {error.message}")
    assert not problems, "\n".join(problems)
    assert {
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "Pod",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    } <= kinds


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_shipped_crds_validate_strictly(version: str) -> None:
    """The CRDs as `helm install` sends them (crds/, rendered with --include-crds)."""
    shipped = of_kind(render(extra=("--include-crds",)), "CustomResourceDefinition")
    assert {d["spec"]["names"]["kind"] for d in shipped} == set(crds())
    for crd in shipped:
        kubernetes_validate.validate(crd, version, strict=True)


def test_strict_validation_catches_a_typo() -> None:
    """The check above can fail: an unknown field in a pod spec is reported."""
    deployment = copy.deepcopy(next(d for _, d in BUILTIN if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, NEWEST, strict=True)


def _unknown_fields(schema: dict[str, Any], value: Any, where: str = "") -> list[str]:
    """Fields the CRD schema does not declare: the API server would silently drop them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                problems.append(f"{where}.{key}: not in the CRD schema")
            elif key != "metadata":
                problems += _unknown_fields(schema["properties"][key], item, f"{where}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            problems += _unknown_fields(schema["additionalProperties"], item, f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += _unknown_fields(schema["items"], item, f"{where}[{i}]")
    return problems


def test_custom_resources_match_their_crds() -> None:
    schemas = {
        kind: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for kind, crd in crds().items()
    }
    checked = set()
    problems = []
    for case, doc in OBJECTS:
        if not doc["apiVersion"].startswith("tollgate.dev/"):
            continue
        assert doc["apiVersion"] == "tollgate.dev/v1alpha1"
        checked.add(doc["kind"])
        where = f"[{case}] {doc['kind']}/{doc['metadata']['name']}"
        problems += [f"{where} {p}" for p in validate_custom_resource(doc)]
        problems += [f"{where} {p}" for p in _unknown_fields(schemas[doc["kind"]], doc)]
    assert not problems, "\n".join(problems)
    assert checked == {"InferenceGateway", "QuotaPolicy", "GPUExporter"}


def test_crd_check_catches_bad_and_unknown_fields() -> None:
    """The check above can fail: a value the CRD rejects, and a field it does not know."""
    gateway = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "InferenceGateway"))
    gateway["spec"]["replicas"] = -1
    assert validate_custom_resource(gateway)
    gateway["spec"]["replicas"] = 1
    gateway["spec"]["upstream"]["timeout"] = 5
    schema = crds()["InferenceGateway"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _unknown_fields(schema, gateway) == [".spec.upstream.timeout: not in the CRD schema"]


def _round_trip(model: Any, doc: Manifest) -> Any:
    """Parse with the prometheus-operator model and require nothing to be lost: the model
    ignores unknown fields, so a misspelt one shows up as a difference."""
    parsed = model.model_validate(doc)
    again = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert again == doc, f"{doc['kind']}/{doc['metadata']['name']} changed by the model"
    return parsed


def test_service_monitors_match_the_prometheus_operator_model() -> None:
    monitors = [d for _, d in OBJECTS if d["kind"] == "ServiceMonitor"]
    assert len({m["metadata"]["name"] for m in monitors}) == 3  # gateway, exporter, operator
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        parsed = _round_trip(prometheus_operator.ServiceMonitor, monitor)
        assert parsed.spec.endpoints and parsed.spec.selector.match_labels


def test_round_trip_check_catches_a_typo() -> None:
    monitor = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(AssertionError):
        _round_trip(prometheus_operator.ServiceMonitor, monitor)


def test_prometheus_rule_matches_the_model_and_promtool(tmp_path: Path) -> None:
    (rule,) = of_kind(render(MATRIX["monitoring"]), "PrometheusRule")
    _round_trip(prometheus_operator.PrometheusRule, rule)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/ensure-tools.sh installs it (Debian prometheus)"
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
