"""The shipped Prometheus and Alertmanager configs pass their own tools: promtool and amtool.

The binaries come from Debian's prometheus and prometheus-alertmanager packages; .ci/run installs them, so in CI
these tests run. Without the binaries they skip and say so.
"""

from __future__ import annotations

import re

import yaml
from _deploy_tools import ALERTMANAGER_CONFIG, ALERTS, PROMETHEUS_DIR, ROOT, run_tool, tool

RUNBOOK = ROOT / "docs" / "runbook.md"


def shipped_alerts() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules():
    r = run_tool([tool("promtool"), "check", "rules", str(ALERTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(shipped_alerts())} rules found" in r.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert():
    """alerts_test.yml: every alert fires in some case and is expected silent (exp_alerts: []) in another."""
    test_file = PROMETHEUS_DIR / "alerts_test.yml"
    r = run_tool([tool("promtool"), "test", "rules", str(test_file)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    cases = [c for t in yaml.safe_load(test_file.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for rule in shipped_alerts():
        name = rule["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it stays silent"


def test_promtool_check_config_both_prometheus_configs():
    for name in ("prometheus.yml", "prometheus-local.yml"):
        r = run_tool([tool("promtool"), "check", "config", str(PROMETHEUS_DIR / name)])
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        assert "SUCCESS" in r.stdout


def test_local_and_compose_prometheus_configs_differ_only_in_addresses():
    def load(name: str) -> dict:
        return yaml.safe_load((PROMETHEUS_DIR / name).read_text())

    compose, local = load("prometheus.yml"), load("prometheus-local.yml")
    assert compose["rule_files"] == local["rule_files"] == ["alerts.yml"]
    assert [j["job_name"] for j in compose["scrape_configs"]] == [j["job_name"] for j in local["scrape_configs"]]
    assert {j["job_name"] for j in compose["scrape_configs"]} >= {"symguard", "prometheus"}
    for doc in (compose, local):  # the alerts select on job="symguard"
        job = next(j for j in doc["scrape_configs"] if j["job_name"] == "symguard")
        assert job.get("metrics_path", "/metrics") == "/metrics"
    local_targets = [t for j in local["scrape_configs"] for sc in j["static_configs"] for t in sc["targets"]]
    assert all(t.startswith("127.0.0.1:") for t in local_targets), local_targets


def test_amtool_check_config():
    r = run_tool([tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "1 inhibit rules" in r.stdout


def test_alertmanager_groups_by_alertname_and_model_and_inhibits_on_job():
    cfg = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert cfg["route"]["group_by"] == ["alertname", "model"]
    (inhibit,) = cfg["inhibit_rules"]
    assert inhibit["equal"] == ["job"]
    names = {r["alert"] for r in shipped_alerts()}
    source = re.search(r'alertname=~"([^"]+)"', inhibit["source_matchers"][0]).group(1).split("|")
    target = re.search(r'alertname=~"([^"]+)"', inhibit["target_matchers"][0]).group(1).split("|")
    assert set(source) == {"SymguardDown", "SymguardNotReady"} and set(source) <= names
    assert set(target) == {n for n in names if "OOD" in n or "Reflection" in n}
    # every alert the inhibit rule targets keeps the label it is matched on
    for rule in shipped_alerts():
        if rule["alert"] in target:
            assert re.search(r"by \(job,", rule["expr"]), rule["alert"]


def test_every_alert_is_documented_with_a_runbook_section():
    """summary, description and a `runbook` annotation pointing at an existing heading of docs/runbook.md."""
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")  # GitHub's anchor slug
        for h in re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), re.M)
    }
    for rule in shipped_alerts():
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), rule["alert"]
        path, _, anchor = ann["runbook"].partition("#")
        assert path == "docs/runbook.md" and anchor == rule["alert"].lower(), ann["runbook"]
        assert anchor in headings, f"docs/runbook.md has no section for {rule['alert']}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
