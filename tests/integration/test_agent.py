"""xvs-agent end to end, with real components in namespaces: the xvs role
(run by ansible-playbook in the balancer's namespace) installs the agent,
the agent runs from its unit's own ExecStart there, checks the real HTTP
servers of three backends, drains one whose server stops and brings it
back, keeps it drained through a no-change role run, serves metrics that
Prometheus' own parser reads and that match xvs_info, and survives a
restart without flapping.  The check types run against real servers."""
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ansible_collections.xvs.lb.plugins.module_utils import _health, _loader, _probes, _spec
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane
from xvstest.lab import Lab, VIP, curl, dsr_lab, http_server, inside, stop_http_server, wait_for
from xvstest.modules import BIN, Modules, ansible_env

BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22", "b3": "192.0.2.23"}
INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.4, 2, 2
CHECK = {"type": "http", "path": "/whoami", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE,
         "fall": FALL}
METRICS = "127.0.0.1:9405"     # inside the balancer's namespace


class Balancer(object):
    """The role applied to the balancer namespace, and its agent."""

    def __init__(self, lab, bpffs, tmp_path):
        self.lab, self.ns = lab, lab.name("bal")
        self.root = os.path.join(bpffs, "agent")
        self.etc = tmp_path / "etc"      # stands in for /etc/systemd/system, and holds xvs/
        self.etc.mkdir()
        self.state_file = str(self.etc / "xvs" / "state.json")
        self.textfile = str(tmp_path / "xvs.prom")
        self.agent, self.log = None, str(tmp_path / "agent.log")
        self.vars = {
            "xvs_interfaces": ["eth0"], "xvs_bpffs": self.root, "xvs_install_packages": False,
            "xvs_sizes": {"flow_table_size": 65536, "max_services": 8}, "xvs_purge_services": True,
            "xvs_services": [{"address": VIP, "port": 80, "check": CHECK,
                              "destinations": [{"address": a} for a in sorted(BACKENDS.values())]}],
            "xvs_state_dir": str(self.etc / "xvs"), "xvs_lib_dir": str(tmp_path / "lib"),
            "xvs_restore_bin": str(tmp_path / "xvs-restore"), "xvs_agent_bin": str(tmp_path / "xvs-agent"),
            "xvs_cli_bin": str(tmp_path / "xvs"),
            "xvs_systemd_dir": str(self.etc), "xvs_metrics_listen": METRICS,
            "xvs_metrics_textfile": self.textfile}
        self.playbook = str(tmp_path / "role.yml")
        with open(self.playbook, "w") as f:
            json.dump([{"hosts": "localhost", "gather_facts": False,
                        "tasks": [{"ansible.builtin.include_role": {"name": "xvs.lb.xvs"}}]}], f)
        self.mods = Modules(self.ns, self.root)
        self.mods.state_file = self.state_file

    def role(self):
        """changed= of one ansible-playbook run of the role."""
        r = subprocess.run(["ip", "netns", "exec", self.ns, os.path.join(BIN, "ansible-playbook"),
                            "-i", "localhost,", "-c", "local", "-e", json.dumps(self.vars), self.playbook],
                           env=ansible_env(), capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "This host has no systemd: xvs-agent is installed but not started" in r.stdout
        return int(re.search(r"localhost\s+:.*changed=(\d+)", r.stdout).group(1))

    def exec_start(self):
        with open(str(self.etc / "xvs-agent.service")) as f:
            line = [x for x in f.read().splitlines() if x.startswith("ExecStart=")]
        return shlex.split(line[0][len("ExecStart="):])

    def start_agent(self):
        out = open(self.log, "a")
        self.agent = subprocess.Popen(["ip", "netns", "exec", self.ns] + self.exec_start(), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    def stop_agent(self):
        """SIGTERM, as systemd stops it; its exit status."""
        self.agent.send_signal(signal.SIGTERM)
        try:
            return self.agent.wait(timeout=10)
        finally:
            self.agent = None

    def logged(self):
        with open(self.log) as f:
            return f.read()

    def weights(self):
        with DataPlane(self.root) as dp:
            svc = dp.service(VIP, 80, "tcp")
        return dict((d["address"], d["weight"]) for d in svc["destinations"])

    def info(self):
        rc, res = self.mods.call("xvs_info", {})
        assert rc == 0, res
        return res

    def scrape(self):
        r = self.lab.sh(self.ns, "curl -sf http://%s/metrics" % METRICS, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def close(self):
        if self.agent is not None:
            os.killpg(self.agent.pid, signal.SIGKILL)
            self.agent.wait()
        with inside(self.ns):
            _loader.detach("eth0")
        _loader.unpin_all(self.root)
        _health.remove(self.state_file)
        self.mods.close()


def timed(predicate, what, limit):
    """Seconds until predicate() holds, failing past limit (+ a margin
    to see how far past)."""
    start = time.monotonic()
    wait_for(predicate, timeout=limit + 5, what=what)
    took = time.monotonic() - start
    assert took <= limit, "%s took %.2fs, more than %.2fs" % (what, took, limit)
    print("%s in %.2fs (limit %.2fs)" % (what, took, limit))     # shown with pytest -s
    return took


def samples(text):
    """{(name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def dest_labels(address):
    return (("destination", address), ("port", "80"), ("protocol", "tcp"), ("vip", VIP))


def check_against_info(metrics, before, after):
    """The metrics lie between two xvs_info reads: exactly equal where no
    traffic passed (service and destination counters: nothing was sent to
    the VIP), within the two reads for the global counters (the agent's
    own checks pass through the balancer's interface)."""
    for name, value in before["counters"].items():
        metric = {"rx_packets": ("xvs_received_packets_total", ()),
                  "rx_bytes": ("xvs_received_bytes_total", ())}.get(name)
        if metric is None and name.startswith("drop_"):
            metric = ("xvs_dropped_packets_total", (("reason", name[len("drop_"):]),))
        elif metric is None and name in ("pass", "tx", "redirect", "icmp_echo_reply", "icmp_too_big"):
            metric = ("xvs_packets_total", (("action", name),))
        elif metric is None:
            metric = ("xvs_%s_total" % name, ())
        assert value <= metrics[metric] <= after["counters"][name], (name, metric)
    svc_before, svc_after = before["services"][0], after["services"][0]
    assert svc_before["counters"] == svc_after["counters"]
    svc = (("port", "80"), ("protocol", "tcp"), ("vip", VIP))
    for f in ("packets", "bytes", "new_flows"):
        assert metrics[("xvs_service_%s_total" % f, svc)] == svc_before["counters"][f] > 0
        for d in svc_before["destinations"]:
            assert metrics[("xvs_destination_%s_total" % f, dest_labels(d["address"]))] == d["counters"][f]
    for d in svc_before["destinations"]:
        assert metrics[("xvs_destination_weight", dest_labels(d["address"]))] == d["weight"]
    table = before["flow_table"]
    assert table["families"] == after["flow_table"]["families"] and table["families"]["ipv4"]["capacity"] == 65536
    for family, t in table["families"].items():
        assert metrics[("xvs_flow_table_capacity", (("family", family),))] == t["capacity"]
        assert metrics[("xvs_flow_table_entries", (("family", family),))] == t["entries"]
    assert table["capacity"] == sum(t["capacity"] for t in table["families"].values())
    assert table["entries"] == sum(t["entries"] for t in table["families"].values())
    assert metrics[("xvs_flow_table_evictions_total", ())] == table["evicted"]


@pytest.fixture
def balancer(bpffs, tmp_path):
    with dsr_lab("xg", tmp_path, BACKENDS) as lab:
        b = Balancer(lab, bpffs, tmp_path)
        try:
            yield b
        finally:
            b.close()


def test_agent_drains_a_dead_backend_and_brings_it_back(balancer, tmp_path):
    b, lab = balancer, balancer.lab
    assert b.role() > 0
    b.start_agent()
    wait_for(lambda: "1 service(s), 3 checked destination(s)" in b.logged(), what="the agent's start")
    # every backend answers: new connections reach all three
    assert {curl(lab, "whoami", 20000 + i).stdout for i in range(30)} == set(BACKENDS)

    # b2's server stops: within fall x interval + 1 s it gets no new flows
    stop_http_server(lab, "b2")
    timed(lambda: b.weights()[BACKENDS["b2"]] == 0, "b2 drained", FALL * INTERVAL + 1)
    answers = [curl(lab, "whoami", 21000 + i) for i in range(200)]
    assert [r.returncode for r in answers] == [0] * 200
    assert {r.stdout for r in answers} == {"b1", "b3"}
    assert re.search(r"destination 192\.0\.2\.22 down: .*Connection refused.*\(2 failed check\(s\) in a row\)",
                     b.logged()), b.logged()
    assert stat.S_IMODE(os.stat(_health.path_for(b.state_file)).st_mode) == 0o600

    # a role run while it is down changes nothing and does not bring it back
    assert b.role() == 0
    assert b.weights() == {BACKENDS["b1"]: 1, BACKENDS["b2"]: 0, BACKENDS["b3"]: 1}
    with open(b.state_file) as f:
        assert [d["weight"] for d in json.load(f)["services"][0]["destinations"]] == [1, 1, 1]

    # metrics, over HTTP and parsed by Prometheus' parser, between two xvs_info reads
    before = b.info()
    assert [(f["destination"], f["reason"]) for f in before["failing"]] == [
        (BACKENDS["b2"], "Connection refused (port 80)")]
    metrics = samples(b.scrape())
    after = b.info()
    check_against_info(metrics, before, after)
    assert metrics[("xvs_destination_healthy", dest_labels(BACKENDS["b2"]))] == 0
    assert metrics[("xvs_destination_healthy", dest_labels(BACKENDS["b1"]))] == 1
    assert metrics[("xvs_destination_desired_weight", dest_labels(BACKENDS["b2"]))] == 1
    assert metrics[("xvs_service_up", (("port", "80"), ("protocol", "tcp"), ("vip", VIP)))] == 1
    assert metrics[("xvs_dataplane_up", ())] == 1
    for address in BACKENDS.values():
        assert 0 < metrics[("xvs_check_duration_seconds", dest_labels(address))] < TIMEOUT + 0.1
    # the node_exporter textfile: the next one written after a read matches likewise
    written = os.stat(b.textfile).st_mtime_ns
    before = b.info()
    wait_for(lambda: os.stat(b.textfile).st_mtime_ns != written, timeout=20, what="the textfile rewritten")
    after = b.info()
    with open(b.textfile) as f:
        check_against_info(samples(f.read()), before, after)

    # b2's server is back: within rise x interval + 1 s it gets new flows again
    http_server(lab, "b2", tmp_path / "b2")
    timed(lambda: b.weights()[BACKENDS["b2"]] == 1, "b2 back", RISE * INTERVAL + 1)
    assert "b2" in {curl(lab, "whoami", 22000 + i).stdout for i in range(30)}

    # a restart re-learns health without flapping: down stays down, up stays up
    stop_http_server(lab, "b2")
    wait_for(lambda: b.weights()[BACKENDS["b2"]] == 0, what="b2 drained again")
    assert b.stop_agent() == 0 and b.logged().rstrip().endswith("xvs-agent: stopped")
    b.start_agent()
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        seen.add(tuple(sorted(b.weights().items())))
        time.sleep(0.02)
    assert seen == {((BACKENDS["b1"], 1), (BACKENDS["b2"], 0), (BACKENDS["b3"], 1))}
    assert b.logged().count("1 service(s), 3 checked destination(s)") == 2
    http_server(lab, "b2", tmp_path / "b2")
    timed(lambda: b.weights()[BACKENDS["b2"]] == 1, "b2 back after the restart", RISE * INTERVAL + 1)


# ---- each check type against a real server ------------------------------------
SERVER = "192.0.2.50"
# an HTTPS server that, like a name-based virtual host, serves only the
# TLS server name backend.example
HTTPS_SERVER = """
import http.server, ssl, sys
httpd = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
ctx.sni_callback = lambda sock, name, c: None if name == "backend.example" else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
"""


def check(kind, **options):
    return _spec.check("check", dict(options, type=kind))


@pytest.fixture
def servers(tmp_path):
    """A namespace with SERVER on lo serving HTTP on 8080 (www/ok) and
    HTTPS with a self-signed certificate on 8443."""
    with Lab("xk") as lab:
        ns = lab.add("srv")
        lab.sh(ns, "ip addr add %s/32 dev lo" % SERVER)
        www = tmp_path / "www"
        www.mkdir()
        (www / "ok").write_text("ok")
        key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=backend.example"], check=True, capture_output=True)
        (tmp_path / "https.py").write_text(HTTPS_SERVER)
        lab.bg(ns, "/usr/bin/python3 -m http.server 8080 --bind %s --directory %s" % (SERVER, www))
        lab.bg(ns, "sh -c 'cd %s && exec /usr/bin/python3 %s %s 8443 %s %s'"
               % (www, tmp_path / "https.py", SERVER, cert, key))
        for scheme, port in (("http", 8080), ("https", 8443)):
            url = "%s://backend.example:%d/ok" % (scheme, port)     # the name the https server serves
            wait_for(lambda: lab.sh(ns, "curl -skf -o /dev/null --connect-to backend.example:%d:%s:%d %s"
                                    % (port, SERVER, port, url), check=False).returncode == 0,
                     what="server on %d" % port)
        yield ns


@pytest.mark.parametrize("spec,healthy,reason", [
    (check("tcp", port=8080), True, "connected to port 8080"),
    (check("tcp", port=8081), False, "Connection refused (port 8081)"),
    (check("http", port=8080, path="/ok"), True, "HTTP status 200"),
    (check("http", port=8080, path="/missing"), False, "HTTP status 404, expected 200"),
    (check("http", port=8080, path="/missing", expect_status=404), True, "HTTP status 404"),
    (check("https", port=8443, path="/ok", host="backend.example"), True, "HTTP status 200"),
    (check("https", port=8443, path="/ok"), False, "TLS: "),       # no server name: refused
    (check("https", port=8080, path="/ok"), False, "TLS: "),
    (check("exec", command="/bin/sh -c 'test \"$XVS_DESTINATION:$XVS_PORT:$XVS_SERVICE_PORT\" = %s:80:80'"
           % SERVER), True, "exit status 0"),
    (check("exec", command="/bin/sh -c 'echo sick >&2; exit 3'"), False, "exit status 3: sick"),
    (check("exec", command="/nonexistent/check"), False, "No such file or directory"),
    (check("exec", command="/bin/sleep 5", timeout=0.3, interval=1), False, "no answer within 0.3s"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_check_types_against_real_servers(servers, spec, healthy, reason):
    with inside(servers):
        ok, why = _probes.run_check(spec, SERVER, (VIP, 80, "tcp"))
    assert ok == healthy and reason in why, why


SERVER6 = "2001:db8::50"
STRICT_HOST_SERVER = """
import http.server, socket, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):       # 400 for a Host header that is not a valid one, as nginx answers
        self.send_response(200 if self.headers["Host"].split("]:")[0].rstrip("]") == "[" + sys.argv[1] else 400)
        self.end_headers()
class Server(http.server.HTTPServer):
    address_family = socket.AF_INET6
Server((sys.argv[1], 8080), Handler).serve_forever()
"""


def test_http_check_of_an_ipv6_destination_sends_a_valid_host(tmp_path):
    """An IPv6 literal in the Host header goes in brackets (RFC 7230
    section 5.4): a server as strict as nginx answers the check 200."""
    (tmp_path / "strict.py").write_text(STRICT_HOST_SERVER)
    with Lab("xh") as lab:
        ns = lab.add("srv")
        lab.sh(ns, "ip link set lo up && ip -6 addr add %s/128 dev lo nodad" % SERVER6)
        lab.bg(ns, "/usr/bin/python3 %s %s" % (tmp_path / "strict.py", SERVER6))
        wait_for(lambda: lab.sh(ns, "curl -sf -o /dev/null http://[%s]:8080/" % SERVER6, check=False).returncode == 0,
                 what="the IPv6 server")
        with inside(ns):
            assert _probes.run_check(check("http", port=8080), SERVER6, ("2001:db8::10", 80, "tcp")) == \
                (True, "HTTP status 200")
