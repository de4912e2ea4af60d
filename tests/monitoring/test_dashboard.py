"""The Grafana dashboard: it is what build_dashboard.py writes, it is importable (datasource
variable, schema version, panels wired to it), and it covers what operators need."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from promql import family, metric_names, sample_names

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"

DASHBOARD = MONITORING / "grafana-dashboard.json"
DS_REF = {"type": "prometheus", "uid": "${datasource}"}

# What the exporter's GPU panels must show (brief: utilization, memory, temperature, power,
# clocks, XID, ECC, throttle reasons).
GPU_METRICS = {
    "gpu_utilization_percent",
    "gpu_memory_used_bytes",
    "gpu_memory_free_bytes",
    "gpu_temperature_celsius",
    "gpu_power_watts",
    "gpu_sm_clock_hertz",
    "gpu_memory_clock_hertz",
    "gpu_xid_errors_total",
    "gpu_ecc_errors_total",
    "gpu_clock_event_active",
    "gpu_exporter_nvml_up",
}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def dashboard_names(dashboard: dict[str, Any]) -> set[str]:
    return {
        name
        for panel in data_panels(dashboard)
        for target in panel["targets"]
        for name in metric_names(target["expr"])
    }


def test_committed_json_is_what_the_generator_writes() -> None:
    generator = MONITORING / "build_dashboard.py"
    spec = importlib.util.spec_from_file_location("build_dashboard", generator)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), (
        "grafana-dashboard.json is stale: run .venv/bin/python deploy/monitoring/build_dashboard.py"
    )


def test_dashboard_is_importable_with_a_prometheus_datasource_variable() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "model", "node", "gpu"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DS_REF
        assert variables[name]["allValue"] == ".*"


def test_every_panel_has_the_datasource_and_queries() -> None:
    dashboard = load()
    panels = data_panels(dashboard)
    assert len(panels) >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for panel in panels:
        assert panel["datasource"] == DS_REF, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS_REF, panel["title"]
            assert target["expr"].strip(), panel["title"]
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
    for row in (p for p in dashboard["panels"] if p["type"] == "row"):
        assert "targets" not in row and row["title"]


def test_gateway_queries_honour_the_namespace_and_job_variables() -> None:
    for panel in data_panels(load()):
        for target in panel["targets"]:
            expr = target["expr"]
            if any(n.startswith(("tollgate_", "process_")) for n in metric_names(expr)):
                assert 'namespace=~"$namespace"' in expr and 'job=~"$job"' in expr, expr


def test_every_gateway_metric_family_has_a_panel(gateway_scrape: str) -> None:
    """A metric the gateway exports and no panel shows is a metric nobody looks at: when a
    new family appears, give it a panel in build_dashboard.py."""
    exported = {family(n) for n in sample_names(gateway_scrape) if n.startswith("tollgate_")}
    shown = {family(n) for n in dashboard_names(load())}
    assert exported <= shown, f"gateway metrics without a panel: {sorted(exported - shown)}"


def test_gpu_panels_show_the_exporter_metrics() -> None:
    names = dashboard_names(load())
    assert names >= GPU_METRICS, GPU_METRICS - names
    for panel in data_panels(load()):
        for target in panel["targets"]:
            gpu_series = {n for n in metric_names(target["expr"]) if n.startswith("gpu_")}
            if gpu_series - {"gpu_exporter_nvml_up"}:
                assert "{{node}}" in target["legendFormat"], panel["title"]
                assert 'node=~"$node"' in target["expr"], panel["title"]


def test_latency_panels_are_percentiles_over_histogram_buckets() -> None:
    panels = {p["title"]: p for p in data_panels(load())}
    for title, bucket in {
        "Request latency": "tollgate_request_duration_seconds_bucket",
        "Time to first token": "tollgate_time_to_first_token_seconds_bucket",
        "Time per output token": "tollgate_time_per_output_token_seconds_bucket",
        "Gateway overhead": "tollgate_gateway_overhead_seconds_bucket",
        "Upstream latency": "tollgate_upstream_latency_seconds_bucket",
    }.items():
        exprs = [t["expr"] for t in panels[title]["targets"]]
        for quantile in ("0.5", "0.9", "0.99"):
            assert any(
                e.startswith(f"histogram_quantile({quantile},") and bucket in e and "le)" in e
                for e in exprs
            ), (title, quantile)


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends Prometheus: intervals filled in, "All" variables as `.*`."""
    expr = re.sub(r"\$__rate_interval|\$__interval", "5m", expr)
    expr = expr.replace("$__range", "3h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query (variables filled in) as a recording rule."""
    dashboard = load()
    rules = [
        {"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": grafana_to_promql(e)}
        for panel in data_panels(dashboard)
        for target in panel["targets"]
        if (e := target["expr"])
    ]
    rules += [
        {"record": f"dashboard:variable:{v['name']}", "expr": grafana_to_promql(m.group(1))}
        for v in dashboard["templating"]["list"]
        if v["type"] == "query" and (m := re.match(r"label_values\((.*), \w+\)$", v["definition"]))
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
