"""values.schema.json (and the chart's few cross-key checks) reject bad values, through the
real helm, with a message that names the key and the problem. A typo must fail the
install, never be silently ignored: unknown keys are rejected at every level."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml
from chart_support import CHART, NAMESPACE, render, render_error

SCHEMA = json.loads((CHART / "values.schema.json").read_text())

# (values, what the error must say). The messages are helm's (JSON schema) or the chart's.
BAD: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown top-level key", {"replica": 2}, ["additional properties 'replica' not allowed"]),
    (
        "unknown nested key",
        {"gateway": {"upstream": {"uri": "http://x"}}},
        ["/gateway/upstream", "additional properties 'uri' not allowed"],
    ),
    (
        "typo in a resources block",
        {"gateway": {"resources": {"request": {"cpu": "1"}}}},
        ["/gateway/resources", "'request' not allowed"],
    ),
    (
        "replicas as text",
        {"gateway": {"replicas": "two"}},
        ["/gateway/replicas", "want null or integer"],
    ),
    ("negative replicas", {"gateway": {"replicas": -1}}, ["/gateway/replicas", "minimum"]),
    (
        "upstream without scheme",
        {"gateway": {"upstream": {"url": "vllm:8000"}}},
        ["/gateway/upstream/url", "does not match pattern"],
    ),
    (
        "bad CPU quantity",
        {"operator": {"resources": {"requests": {"cpu": "lots"}}}},
        ["/operator/resources/requests/cpu", "does not match pattern"],
    ),
    (
        "resources without limits",
        {"gateway": {"resources": {"limits": None}}},
        ["/gateway/resources", "missing property 'limits'"],
    ),
    (
        "unknown database mode",
        {"database": {"mode": "sqlite"}},
        ["/database/mode", "'embedded'", "'external'", "'none'"],
    ),
    (
        "external URL of another database",
        {"database": {"mode": "external", "external": {"url": "mysql://x"}}},
        ["/database/external/url", "does not match pattern"],
    ),
    (
        "bad log level",
        {"operator": {"logLevel": "verbose"}},
        ["/operator/logLevel", "'INFO'"],
    ),
    (
        "watch namespace not a DNS label",
        {"operator": {"watchNamespaces": ["Team_A"]}},
        ["/operator/watchNamespaces/0", "does not match pattern"],
    ),
    (
        "empty quota policy",
        {"quotaPolicies": {"free": {}}},
        ["/quotaPolicies/free", "minProperties"],
    ),
    (
        "zero limit",
        {"quotaPolicies": {"free": {"tokensPerDay": 0}}},
        ["/quotaPolicies/free/tokensPerDay", "minimum"],
    ),
    (
        "misspelt limit",
        {"quotaPolicies": {"free": {"tokensPerMonth": 10}}},
        ["/quotaPolicies/free", "'tokensPerMonth' not allowed"],
    ),
    (
        "policy name with capitals",
        {"quotaPolicies": {"Free": {"tokensPerDay": 10}}},
        ["/quotaPolicies", "additional properties 'Free' not allowed"],
    ),
    (
        "PDB percentage without %",
        {"gateway": {"podDisruptionBudget": {"maxUnavailable": "half"}}},
        ["/gateway/podDisruptionBudget/maxUnavailable", "does not match pattern"],
    ),
    (
        "exporter interval too short",
        {"gpuExporter": {"intervalSeconds": 0.1}},
        ["/gpuExporter/intervalSeconds", "minimum"],
    ),
    (
        "relative pod-resources path",
        {"gpuExporter": {"podResources": {"hostPath": "var/lib/kubelet"}}},
        ["/gpuExporter/podResources/hostPath", "does not match pattern"],
    ),
    (
        "scrape interval without unit",
        {"monitoring": {"serviceMonitor": {"interval": "30"}}},
        ["/monitoring/serviceMonitor/interval", "does not match pattern"],
    ),
    (
        "dashboard flag as text",
        {"monitoring": {"dashboard": {"enabled": "yes"}}},
        ["/monitoring/dashboard/enabled", "want boolean"],
    ),
    (
        "image registry with scheme",
        {"images": {"registry": "https://ghcr.io"}},
        ["/images/registry", "does not match pattern"],
    ),
    (
        "bad toleration operator",
        {"gateway": {"tolerations": [{"key": "gpu", "operator": "In"}]}},
        ["/gateway/tolerations/0/operator", "'Exists'"],
    ),
    (
        "gateway name too long",
        {"gateway": {"name": "g" * 41}},
        ["/gateway/name", "maxLength"],
    ),
    # Checks that span several keys: the chart's own messages.
    (
        "external mode without a URL or Secret",
        {"database": {"mode": "external"}},
        [
            "database.mode is external: set database.external.url or "
            "database.external.existingSecret.name"
        ],
    ),
    (
        "external URL and Secret both",
        {
            "database": {
                "mode": "external",
                "external": {"url": "postgresql://a@b/c", "existingSecret": {"name": "db"}},
            }
        },
        ["set either url or existingSecret.name, not both"],
    ),
    (
        "external settings left unused",
        {"database": {"external": {"url": "postgresql://a@b/c"}}},
        ['database.external is set but database.mode is "embedded"'],
    ),
    (
        "watched namespaces leave out the release namespace",
        {"operator": {"watchNamespaces": ["llm"]}},
        [f'leaves out the release namespace "{NAMESPACE}"'],
    ),
    (
        "ServiceMonitors with nothing to scrape",
        {"gateway": {"enabled": False}, "monitoring": {"serviceMonitor": {"enabled": True}}},
        ["monitoring.serviceMonitor.enabled needs gateway.enabled or gpuExporter.enabled"],
    ),
]


@pytest.mark.parametrize(("values", "messages"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_values_are_rejected_clearly(values: dict[str, Any], messages: list[str]) -> None:
    error = render_error(values)
    for message in messages:
        assert message in error, f"{message!r} not in:\n{error}"


def test_long_release_names_fail_with_a_hint() -> None:
    """The gateway name defaults to the release name; the CRD allows 40 characters."""
    from chart_support import CHART as chart
    from chart_support import helm

    result = helm("template", "t" * 41, str(chart), check=False)
    assert result.returncode != 0
    assert "longer than 40 characters: set gateway.name" in result.stderr
    helm("template", "t" * 41, str(chart), values={"gateway": {"name": "short"}})


def test_good_variants_are_accepted() -> None:
    render({"gateway": {"podDisruptionBudget": {"maxUnavailable": "25%"}}})
    render(
        {
            "gateway": {
                "resources": {"requests": {"cpu": 1, "memory": "1Gi"}, "limits": {"cpu": "2"}}
            }
        }
    )
    render({"quotaPolicies": {"free": {"tokensPerDay": 1000}}})
    render({"gpuExporter": {"enabled": True, "intervalSeconds": 0.5}})


def test_default_values_satisfy_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(values)


def _loose_objects(schema: dict[str, Any], where: str = "") -> list[str]:
    """Object schemas that would let an unknown key through."""
    problems = []
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "$ref" not in schema:
        extra = schema.get("additionalProperties", True)
        if extra is True:
            problems.append(where or "<root>")
        free_form = not schema.get("properties") and not isinstance(extra, dict)
        if free_form and extra is not False and where:
            problems.append(where)
    for name, sub in schema.get("properties", {}).items():
        problems += _loose_objects(sub, f"{where}/{name}")
    for key in ("definitions", "patternProperties"):
        for name, sub in schema.get(key, {}).items():
            problems += _loose_objects(sub, f"{where}/{key}/{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += _loose_objects(schema[key], f"{where}/{key}")
    return problems


def test_every_object_in_the_schema_is_closed() -> None:
    """additionalProperties false on every structured object; maps say what they hold.
    The three affinity blocks and a topology spread constraint are Kubernetes' own
    (free-form) types."""
    loose = _loose_objects(SCHEMA)
    allowed = {
        "/gateway/topologySpreadConstraints/items",
        "/definitions/affinity/nodeAffinity",
        "/definitions/affinity/podAffinity",
        "/definitions/affinity/podAntiAffinity",
    }
    assert set(loose) == allowed, sorted(set(loose) - allowed)


def test_every_default_value_is_in_the_schema() -> None:
    """values.yaml documents nothing the schema does not know (and vice versa)."""

    def keys(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
        found: list[str] = []
        if "$ref" in schema:
            return found  # a shared type (resources, tolerations...): optional keys
        if isinstance(value, dict) and "properties" in schema:
            for key in schema["properties"]:
                if key not in value:
                    found.append(f"{where}.{key} in the schema, not in values.yaml")
            for key, item in value.items():
                if key in schema["properties"]:
                    found += keys(item, schema["properties"][key], f"{where}.{key}")
        return found

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not keys(values, SCHEMA)
