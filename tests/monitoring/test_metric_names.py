"""Every metric the dashboard and the alert rules query exists in a real scrape of the
gateway or the GPU exporter, and the gateway's scrape passes `promtool check metrics`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from promql import (
    label_values,
    literal_matchers,
    metric_names,
    sample_names,
    variable_query_names,
)

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def dashboard_queries() -> list[tuple[str, set[str]]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    found = [
        (f"panel {p['title']!r}", metric_names(t["expr"]))
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"variable {var['name']}", variable_query_names(var["definition"])))
    return found


def alert_queries() -> list[tuple[str, set[str]]]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    found = [
        (f"alert {r['alert']}", metric_names(r["expr"]))
        for g in rules["groups"]
        for r in g["rules"]
    ]
    tests = yaml.safe_load((MONITORING / "alerts-test.yaml").read_text())
    for case in tests["tests"]:
        for series in case["input_series"]:
            found.append((f"unit test {case['name']!r}", metric_names(series["series"])))
    return found


def test_dashboard_metrics_exist_in_real_scrapes(scraped_names: set[str]) -> None:
    queries = dashboard_queries()
    assert sum(len(names) for _, names in queries) > 40
    missing = [(where, sorted(names - scraped_names)) for where, names in queries]
    assert not [m for m in missing if m[1]], [m for m in missing if m[1]]


def test_alert_metrics_exist_in_real_scrapes(scraped_names: set[str]) -> None:
    queries = alert_queries()
    assert all(names for _, names in queries)
    missing = [(where, sorted(names - scraped_names)) for where, names in queries]
    assert not [m for m in missing if m[1]], [m for m in missing if m[1]]


def all_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [
        (f"panel {p['title']!r}", t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ] + [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_label_values_named_in_queries_exist_in_real_scrapes(
    gateway_scrape: str, fake_gpus_scrape: str, nvml_scrape: str
) -> None:
    """A selector on a misspelt label value (`state="opened"`) selects nothing and its alert
    never fires: every literal label value the queries name is one the services export."""
    exported = label_values(gateway_scrape + fake_gpus_scrape + nvml_scrape)
    checked = 0
    for where, expr in all_expressions():
        for matcher in literal_matchers(expr):
            checked += 1
            assert matcher in exported, f"{where}: no series {matcher} in the scrapes"
    assert checked >= 10


def test_the_scrapes_saw_the_traffic(gateway_scrape: str, nvml_scrape: str) -> None:
    """The scrapes the names are checked against carry the series the traffic produced."""
    assert re.search(r'tollgate_rejections_total\{key="none",reason="auth"\} 1\.0', gateway_scrape)
    assert re.search(
        r'tollgate_rejections_total\{key="[^"]+",reason="breaker"\} [1-9]', gateway_scrape
    )
    assert re.search(
        r"tollgate_circuit_breaker_transitions_total"
        r'\{(?=[^}]*from_state="closed")(?=[^}]*to_state="open")[^}]*\} 1\.0',
        gateway_scrape,
    )
    assert re.search(r'tollgate_upstream_errors_total\{kind="status_5xx"\} 1\.0', gateway_scrape)
    assert re.search(r'tollgate_tokens_total\{[^}]*type="output"\} \d', gateway_scrape)
    assert re.search(r"tollgate_quota_flush_duration_seconds_count [1-9]", gateway_scrape)
    assert re.search(r'gpu_xid_errors_total\{[^}]*xid="79"\} 1', nvml_scrape)


def test_promtool_check_metrics_on_a_gateway_scrape_is_clean(
    promtool: str, gateway_scrape: str
) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=gateway_scrape,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{job=~"$job",'
            ' route!="/x"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        (
            "sum(rate(b_total[5m])) by (status) / ignoring(status) group_left sum(c)",
            {"b_total", "c"},
        ),
        ("time() - d_timestamp_seconds > 60", {"d_timestamp_seconds"}),
        ("e_total > 0 unless e_total offset 10m or on(node) f == bool 1", {"e_total", "f"}),
        ('label_replace(g, "dst", "$1", "src", "(.*)") * 2^30 # a comment naming h', {"g"}),
        ("count by (version) (count by (job, version) (i_info))", {"i_info"}),
        ("max_over_time(j[1h:5m]) and k:recorded:rate5m", {"j", "k:recorded:rate5m"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_literal_matcher_extraction() -> None:
    expr = (
        'sum(rate(a_total{status=~"5..", job=~"$job", state=~"open|half_open"}[5m]))'
        ' / b{type="uncorrected", scope!="aggregate"}'
    )
    assert literal_matchers(expr) == {
        ("a_total", "state", "open"),
        ("a_total", "state", "half_open"),
        ("b", "type", "uncorrected"),
    }
    assert label_values('x_total{a="1",b="two"} 3\n# x{c="d"} 1\n') == {
        ("x_total", "a", "1"),
        ("x_total", "b", "two"),
    }


def test_metric_name_extraction_rejects_what_it_cannot_check() -> None:
    with pytest.raises(ValueError, match="unknown PromQL function"):
        metric_names("rat(x_total[5m])")
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__="x"}')
    assert variable_query_names('label_values(m{node=~"$node"}, gpu)') == {"m"}
    assert variable_query_names("label_values(namespace)") == set()
    assert sample_names('# HELP x y\nx_total{a="b"} 1\ny 2\n') == {"x_total", "y"}
