"""The alert rules: promtool accepts them, their unit tests pass, and each alert carries what
an on-call engineer needs (severity, summary, description, a README entry)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"

RULES = MONITORING / "alerts.yaml"
RULE_TESTS = MONITORING / "alerts-test.yaml"

REQUIRED_ALERTS = {
    "TollgateUpstreamDown",
    "TollgateUpstreamReplicaDown",
    "TollgateCircuitBreakerOpen",
    "TollgateUpstreamBreakerOpen",
    "TollgateHighErrorRatio",
    "TollgateHighTimeToFirstToken",
    "TollgateHighLatency",
    "TollgateQuotaStoreDown",
    "TollgateQuotaFlushErrors",
    "TollgateQuotaFlushLagging",
    "TollgateConfigReloadFailed",
    "TollgateDrainingTooLong",
    "GPUHot",
    "GPUXidError",
    "GPUUncorrectableECCErrors",
    "GPUExporterNVMLDown",
    "GPUExporterCollectStale",
    "GPUExporterGPUStale",
    "GPUExporterNVMLStuck",
    "GPUExporterAbsent",
}
# Alerts whose promtool unit tests must show them firing on a failing series and staying
# silent on healthy ones.
UNIT_TESTED = {
    "TollgateUpstreamDown",
    "TollgateCircuitBreakerOpen",
    "TollgateQuotaStoreDown",
    "GPUHot",
    "GPUExporterGPUStale",
    "GPUExporterNVMLStuck",
    "GPUExporterAbsent",
}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_accepts_the_rule_file(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found, result.stdout
    assert int(found.group(1)) == len(alert_rules())


def test_promtool_unit_tests_pass(promtool: str) -> None:
    # promtool resolves rule_files relative to the test file
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_broken_rule_fails_its_unit_test(promtool: str, tmp_path) -> None:
    """The unit tests can fail: upstream-down on any (not every) unhealthy upstream does."""
    good = "expr: max without (upstream) (tollgate_upstream_up) == 0"
    broken = RULES.read_text().replace(good, good.replace("max", "min"))
    assert broken != RULES.read_text()
    (tmp_path / "alerts.yaml").write_text(broken)
    (tmp_path / "alerts-test.yaml").write_text(RULE_TESTS.read_text())
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "alerts-test.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "TollgateUpstreamDown" in result.stdout + result.stderr


def test_unit_tests_show_required_alerts_firing_and_silent() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fires >= UNIT_TESTED, UNIT_TESTED - fires
    assert silent >= UNIT_TESTED, UNIT_TESTED - silent
    every = {rule["alert"] for rule in alert_rules()}
    assert fires <= every, f"unit tests name alerts that do not exist: {fires - every}"


def test_every_required_alert_exists_with_severity_and_annotations() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 60, rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_every_alert_is_explained_in_the_readme() -> None:
    readme = (MONITORING / "README.md").read_text()
    missing = [rule["alert"] for rule in alert_rules() if f"`{rule['alert']}`" not in readme]
    assert not missing, f"README.md does not explain: {missing}"
