"""What the monitoring tests share: the shipped alert rules and dashboard,
the metric table of docs/design.md section 3.5, and a real Prometheus
server run in a lab namespace."""
import json
import os
import re
import subprocess
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "files", "monitoring", "xvs-alerts.yml")
DASHBOARD = os.path.join(ROOT, "files", "monitoring", "xvs-dashboard.json")
RULE_TESTS = os.path.join(ROOT, "tests", "monitoring", "xvs-alerts.test.yml")
# what Grafana substitutes in the dashboard's expressions: every balancer,
# and a rate window over several of the test's 1 s scrapes
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "15s"}


def dashboard_exprs():
    """[(panel title, expression)] of the dashboard, with its variables
    substituted as Grafana would."""
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def documented_metrics():
    """The sample names docs/design.md's metric table lists (its {a,b}
    spelled out)."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        text = f.read()
    table = text[text.index("| metric | type | labels |"):]
    table = table[:table.index("\n\n")]
    names = set()
    for row in table.splitlines()[2:]:
        first = row.split(" | ")[0]
        for token in re.findall(r"`((?:xvs|process)_[a-z0-9_{},]+)`", first):
            m = re.match(r"(.*)\{(.*)\}(.*)", token)
            names |= set(m.group(1) + part + m.group(3) for part in m.group(2).split(",")) if m else {token}
    return names


def alert_names():
    import yaml
    with open(RULES) as f:
        return [r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r]


class Prometheus(object):
    """A real Prometheus server (Debian's package) in namespace ns of lab,
    scraping targets every second and evaluating the shipped rules every
    second, with their `for:` durations scaled to seconds so that a test
    sees an alert fire and resolve in a few."""

    def __init__(self, lab, ns, work, targets, listen="127.0.0.1:9090"):
        import yaml
        self.lab, self.ns, self.listen = lab, ns, listen
        os.makedirs(str(work), exist_ok=True)
        with open(RULES) as f:
            rules = yaml.safe_load(f)
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"
        rules_file = os.path.join(str(work), "rules.yml")
        with open(rules_file, "w") as f:
            yaml.safe_dump(rules, f)
        config = os.path.join(str(work), "prometheus.yml")
        with open(config, "w") as f:
            yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                            "rule_files": [rules_file],
                            "scrape_configs": [{"job_name": "xvs", "static_configs": [{"targets": targets}]}]}, f)
        from xvstest.lab import wait_for       # here: the unit tests import this file without pyroute2
        self.wait_for = wait_for
        subprocess.run(["promtool", "check", "config", config], check=True, capture_output=True)
        self.proc = lab.bg(ns, "prometheus --config.file=%s --storage.tsdb.path=%s --web.listen-address=%s"
                           " --log.level=warn" % (config, os.path.join(str(work), "data"), listen))
        wait_for(lambda: self._get("/-/ready") is not None, timeout=30, what="Prometheus ready")

    def _get(self, path):
        r = self.lab.sh(self.ns, "curl -sf 'http://%s%s'" % (self.listen, path), check=False)
        return r.stdout if r.returncode == 0 else None

    def query(self, expr):
        """The result vector of an instant query (a PromQL error raises)."""
        out = json.loads(self._get("/api/v1/query?query=" + urllib.parse.quote(expr)) or "{}")
        assert out.get("status") == "success", (expr, out)
        return out["data"]["result"]

    def alerts(self, name, state="firing"):
        """The labels of alert name in state (pending, firing)."""
        return [r["metric"] for r in self.query('ALERTS{alertname="%s", alertstate="%s"}' % (name, state))]

    def wait_scraped(self, samples=3):
        """Until every target is up and has been scraped samples times."""
        scraped = 'count_over_time(up{job="xvs"}[1m]) >= %d and up{job="xvs"} == 1' % samples
        self.wait_for(lambda: self.query(scraped), timeout=30, what="Prometheus scraping the agent")
