"""The shipped alert rules and dashboard, offline: the real promtool
(Debian's prometheus package) checks the rules and runs a unit test per
alert; the dashboard's expressions parse as PromQL and name only metrics
the agent serves (docs/design.md's table, which tests/integration/test_bgp.py
holds to a live scrape).  tests/integration/test_bgp.py runs them against a
real Prometheus scraping a real agent."""
import re
import subprocess

import yaml

from xvstest.monitoring import RULE_TESTS, RULES, alert_names, dashboard_exprs, documented_metrics


def promtool(*args, cwd=None):
    r = subprocess.run(["promtool"] + list(args), capture_output=True, text=True, cwd=cwd, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_rules_pass_promtool_check():
    assert "SUCCESS: %d rules found" % len(alert_names()) in promtool("check", "rules", RULES)


def test_the_rules_pass_their_unit_tests():
    import os
    assert "SUCCESS" in promtool("test", "rules", os.path.basename(RULE_TESTS), cwd=os.path.dirname(RULE_TESTS))


def test_every_alert_has_a_unit_test_that_fires_it():
    with open(RULE_TESTS) as f:
        tests = yaml.safe_load(f)["tests"]
    fired = set(t["alertname"] for test in tests for t in test["alert_rule_test"] if t.get("exp_alerts"))
    assert fired == set(alert_names())
    assert {"XvsServiceDown", "XvsDestinationFailing", "XvsBgpSessionDown", "XvsVipNotAnnounced",
            "XvsDataplaneDown", "XvsFlowTableNearlyFull", "XvsFlowTableEvictions", "XvsPacketsDropped",
            "XvsAgentApplyFailing", "XvsCheckSlow"} <= fired


def metric_names(expr):
    """The metric names an expression selects (identifiers followed by a
    selector, a range or an operator, that are not functions or keywords)."""
    return set(re.findall(r"\b((?:xvs|process)_[a-z0-9_]+)\b", expr))


def test_the_dashboards_expressions_parse_and_name_served_metrics(tmp_path):
    """promtool parses each expression (as a recording rule: promtool has
    no other offline PromQL check), and each metric it names is one the
    agent serves."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": "dashboard:expr_%d" % i, "expr": expr} for i, (title, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(path))
    served = documented_metrics()
    for title, expr in exprs:
        assert metric_names(expr) and metric_names(expr) <= served | {"up"}, (title, expr)


def test_the_rules_name_served_metrics():
    with open(RULES) as f:
        rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    served = documented_metrics()
    for rule in rules:
        assert metric_names(rule["expr"]) <= served, rule["alert"]
