"""Scale-out over BGP, with real daemons in namespaces: two balancers, each
configured by the xvs role (BIRD's configuration included) and running
BIRD 2 and xvs-agent from the commands the role installs, announce the VIP
over IPv4 sessions and the IPv6 VIP over IPv6 sessions to a router
namespace running BIRD 2 with ECMP (merge paths); a client behind the
router reaches three backends through both, over IPv4 and IPv6.

    client 198.51.100.10, 2001:db8:2::10
       |
    router 198.51.100.1 / 192.0.2.1   BIRD, AS 65000, ECMP on the 5-tuple
       |  (bridge: 192.0.2.0/24, 2001:db8:1::/64)
       +-- bal1 192.0.2.2, ::2  BIRD AS 65001 + xvs-agent + XDP
       +-- bal2 192.0.2.3, ::3  BIRD AS 65001 + xvs-agent + XDP
       +-- b1 .21, b2 .22, b3 .23   VIPs on lo; replies go straight to the router
"""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _health, _loader
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, dest_address
from xvstest.lab import (BGP_BALANCERS as BALANCERS, CLIENT_NET_CLIENT as CLIENT, ECHO_PORT, FRONT6, ROUTER, VIP,
                         VIP6, Lab, build_bgp_lab, echo_server, http_server, inside, next_hops, v6, wait_for)
from xvstest.modules import BIN, ansible_env
from xvstest.monitoring import Prometheus, dashboard_exprs, documented_metrics
from xvstest.packets import flows

BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22", "b3": "192.0.2.23"}
INTERVAL, FALL, RISE = 0.5, 2, 2
BALANCERS6 = sorted(v6(FRONT6, a) for a in BALANCERS.values())


def services():
    dests = [{"address": a} for a in sorted(BACKENDS.values())]
    dests6 = [{"address": v6(FRONT6, a)} for a in sorted(BACKENDS.values())]
    check = {"interval": INTERVAL, "timeout": 0.4, "fall": FALL, "rise": RISE}
    http = dict(check, type="http", path="/whoami")
    return [{"address": VIP, "port": 80, "destinations": dests, "check": http},
            {"address": VIP, "port": ECHO_PORT, "destinations": dests, "check": dict(check, type="tcp")},
            {"address": VIP6, "port": 80, "destinations": dests6, "check": http}]


class Balancer(object):
    """One balancer namespace: the role applied, then BIRD and xvs-agent
    started with the commands the role wrote."""

    def __init__(self, lab, short, bpffs, tmp_path):
        self.lab, self.short, self.ns = lab, short, lab.name(short)
        self.work = tmp_path / short
        (self.work / "etc").mkdir(parents=True)
        self.root = os.path.join(bpffs, "bgp-" + short)
        self.state_file = str(self.work / "etc" / "xvs" / "state.json")
        # in a directory the role must make (without systemd nothing else does)
        self.bird_socket = str(self.work / "run" / "bird" / "bird.ctl")
        self.agent = self.bird = None
        self.vars = {
            "xvs_interfaces": ["eth0"], "xvs_mode": "generic", "xvs_bpffs": self.root,
            "xvs_install_packages": False, "xvs_restore_at_boot": False, "xvs_purge_services": True,
            "xvs_sizes": {"flow_table_size": 65536, "flow_table_size_v6": 65536, "max_services": 8},
            "xvs_services": services(),
            "xvs_state_dir": os.path.dirname(self.state_file), "xvs_lib_dir": str(self.work / "lib"),
            "xvs_agent_bin": str(self.work / "xvs-agent"), "xvs_cli_bin": str(self.work / "xvs"),
            "xvs_systemd_dir": str(self.work / "etc"),
            "xvs_metrics_listen": "127.0.0.1:9405",
            "xvs_bgp": {"local_as": 65001, "router_id": BALANCERS[short], "communities": ["65001:80"],
                        "neighbors": [{"address": ROUTER, "remote_as": 65000},
                                      {"address": v6(FRONT6, ROUTER), "remote_as": 65000}]},
            "xvs_bird_conf": str(self.work / "bird.conf"), "xvs_bird_socket": self.bird_socket}
        self.playbook = str(self.work / "role.yml")
        with open(self.playbook, "w") as f:
            json.dump([{"hosts": "localhost", "gather_facts": False,
                        "tasks": [{"ansible.builtin.include_role": {"name": "xvs.lb.xvs"}}]}], f)

    def role(self):
        r = subprocess.run(["ip", "netns", "exec", self.ns, os.path.join(BIN, "ansible-playbook"), "-i",
                            "localhost,", "-c", "local", "-e", json.dumps(self.vars), self.playbook],
                           env=ansible_env(), capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "This host has no systemd: BIRD is configured but not started" in r.stdout
        return int(re.search(r"localhost\s+:.*changed=(\d+)", r.stdout).group(1))

    def unit_command(self, key):
        with open(str(self.work / "etc" / "xvs-agent.service")) as f:
            line = [x for x in f.read().splitlines() if x.startswith(key + "=")][0]
        return shlex.split(line[len(key) + 1:])

    def start_bird(self):
        # what the role's bird.service drop-in runs, in the foreground
        self.bird = self.lab.bg(self.ns, "/usr/sbin/bird -f -c %s -s %s"
                                % (self.vars["xvs_bird_conf"], self.bird_socket))

    def start_agent(self):
        self.log = open(str(self.work / "agent.log"), "a")
        self.agent = subprocess.Popen(["ip", "netns", "exec", self.ns] + self.unit_command("ExecStart"),
                                      stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop_agent(self, sig=signal.SIGTERM):
        os.killpg(self.agent.pid, sig)
        rc = self.agent.wait(timeout=10)
        self.agent = None
        self.log.close()
        return rc

    def stop_post(self):
        """The unit's ExecStopPost, as systemd runs it after the agent exits."""
        subprocess.run(["ip", "netns", "exec", self.ns] + self.unit_command("ExecStopPost"), check=True,
                       capture_output=True, timeout=30)

    def logged(self):
        with open(str(self.work / "agent.log")) as f:
            return f.read()

    def metrics(self):
        from prometheus_client.parser import text_string_to_metric_families
        r = self.lab.sh(self.ns, "curl -sf http://127.0.0.1:9405/metrics", check=False)
        assert r.returncode == 0, r.stderr
        return dict(((s.name, tuple(sorted(s.labels.items()))), s.value)
                    for fam in text_string_to_metric_families(r.stdout) for s in fam.samples)

    def tables(self):
        """{service key: (the live Maglev half's bytes as the map holds
        them, {slot: destination address})}."""
        out = {}
        with DataPlane(self.root) as dp:
            for key, v in dp._services_raw().items():
                raw = b"".join(dp.maps["maglev"].lookup_range(dp.first_chunk(v.index, v.gen), dp.chunks))
                out[key] = (raw, dict((s, dest_address(d)) for s, d in dp._dest_slots(v.index).items()))
        return out

    def flows(self):
        with DataPlane(self.root) as dp:
            return flows(dp)

    def close(self):
        if self.agent is not None:
            os.killpg(self.agent.pid, signal.SIGKILL)
            self.agent.wait()
            self.log.close()
        with inside(self.ns):
            _loader.detach("eth0")
        _loader.unpin_all(self.root)
        _health.remove(self.state_file)


def whoami(lab, port, vip=VIP):
    return lab.sh(lab.name("cli"), "curl -sg --max-time 3 --local-port %d http://%s/whoami"
                  % (port, "[%s]" % vip if ":" in vip else vip), check=False)


def servers(lab, short):
    """The processes of backend short's HTTP and echo servers."""
    return [p for p in lab.procs
            if p.args[3] == lab.name(short) and ("http.server" in p.args[-1] or "echo.py" in p.args[-1])]


@pytest.fixture
def fleet(bpffs, tmp_path):
    with Lab("xb") as lab:
        build_bgp_lab(lab, tmp_path, BACKENDS)
        bals = dict((short, Balancer(lab, short, bpffs, tmp_path)) for short in BALANCERS)
        try:
            yield lab, bals
        finally:
            for b in bals.values():
                b.close()


def test_two_balancers_behind_ecmp(fleet, tmp_path):
    lab, bals = fleet
    for b in bals.values():
        assert b.role() > 0
        with open(b.vars["xvs_bird_conf"]) as f:
            conf = f.read()
        assert "neighbor %s as 65000;" % ROUTER in conf and "bgp_community.add((65001, 80));" in conf
        b.start_bird()
        b.start_agent()
    # the router learns the VIP from both, and spreads the client's flows over them
    wait_for(lambda: next_hops(lab) == sorted(BALANCERS.values()), timeout=30, what="two next hops")
    assert {whoami(lab, 20000 + i).stdout for i in range(40)} == set(BACKENDS)
    # and the IPv6 VIP over the IPv6 sessions
    wait_for(lambda: next_hops(lab, VIP6) == BALANCERS6, timeout=30, what="two IPv6 next hops")
    assert {whoami(lab, 21000 + i, VIP6).stdout for i in range(40)} == set(BACKENDS)
    # the same configuration gives byte-identical Maglev tables on both
    assert bals["bal1"].tables() == bals["bal2"].tables() and len(bals["bal1"].tables()) == 3
    m = bals["bal1"].metrics()
    assert m[("xvs_vip_announced", (("vip", VIP),))] == 1
    assert m[("xvs_bgp_session_up", (("neighbor", ROUTER), ("protocol", "xvs_192_0_2_1")))] == 1
    assert m[("xvs_vip_announced", (("vip", VIP6),))] == 1
    assert m[("xvs_bgp_session_up", (("neighbor", v6(FRONT6, ROUTER)), ("protocol", "xvs_2001_db8_1__1")))] == 1
    assert m[("xvs_bird_up", ())] == 1

    # 20 long-lived connections through the router, spread over both balancers
    held = []
    with inside(lab.name("cli")):
        for i in range(20):
            s = socket.create_connection((VIP, ECHO_PORT), timeout=5, source_address=(CLIENT, 23000 + i))
            f = s.makefile("rb")
            held.append((s, f, f.readline().strip().decode()))
    assert {name for s, f, name in held} == set(BACKENDS)
    through = [len([fl for fl in b.flows() if fl["port"] == ECHO_PORT]) for b in bals.values()]
    assert sum(through) == 20 and 0 not in through, through     # both balancers carry some

    # take bal1 out: its agent stops and withdraws; the router keeps bal2 alone
    assert bals["bal1"].stop_agent() == 0
    assert "VIP %s withdrawn: the agent is stopping" % VIP in bals["bal1"].logged()
    wait_for(lambda: next_hops(lab) == [BALANCERS["bal2"]], timeout=10, what="one next hop")
    wait_for(lambda: next_hops(lab, VIP6) == [v6(FRONT6, BALANCERS["bal2"])], timeout=10, what="one IPv6 next hop")
    broken = []
    for i, (s, f, name) in enumerate(held):
        try:
            s.sendall(b"ping %d\n" % i)
            if f.readline() != b"ping %d\n" % i:
                broken.append(i)
        except OSError:
            broken.append(i)
    assert broken == [], "%d of 20 connections broke when bal1 left: %s" % (len(broken), broken)
    answers = [whoami(lab, 24000 + i) for i in range(20)]
    assert [r.returncode for r in answers] == [0] * 20
    for s, f, name in held:
        s.close()

    # bal1's agent back: two next hops again; then bal2's agent dies (SIGKILL) and
    # the unit's ExecStopPost withdraws what it left announced
    bals["bal1"].start_agent()
    wait_for(lambda: next_hops(lab) == sorted(BALANCERS.values()), timeout=10, what="bal1 back")
    bals["bal2"].stop_agent(signal.SIGKILL)
    assert next_hops(lab) == sorted(BALANCERS.values())     # a dead agent's route stays...
    bals["bal2"].stop_post()
    wait_for(lambda: next_hops(lab) == [BALANCERS["bal1"]], timeout=10, what="bal2 withdrawn after it died")
    bals["bal2"].start_agent()
    wait_for(lambda: next_hops(lab) == sorted(BALANCERS.values()), timeout=10, what="bal2 back")

    # every backend's servers stop: every service is down, the VIP leaves the router
    start = time.monotonic()
    for short in BACKENDS:
        for p in servers(lab, short):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            lab.procs.remove(p)
    wait_for(lambda: next_hops(lab) == [], timeout=FALL * INTERVAL + 10, what="the VIP withdrawn")
    took = time.monotonic() - start
    wait_for(lambda: next_hops(lab, VIP6) == [], timeout=5, what="the IPv6 VIP withdrawn")
    assert took <= FALL * INTERVAL + 3, "withdrawn after %.1fs" % took
    print("the VIP left the router %.2fs after every backend stopped" % took)     # shown with pytest -s
    assert bals["bal1"].metrics()[("xvs_vip_announced", (("vip", VIP),))] == 0
    # and back when they answer again
    for short in BACKENDS:
        http_server(lab, short, tmp_path / "www" / short)
        echo_server(lab, short)
    wait_for(lambda: next_hops(lab) == sorted(BALANCERS.values()), timeout=RISE * INTERVAL + 10,
             what="the VIP announced again")
    assert whoami(lab, 25000).returncode == 0


def test_alerts_and_dashboard_against_a_real_prometheus(fleet, tmp_path):
    """A real Prometheus (Debian's package) scrapes bal1's agent, with its
    BGP sessions, BIRD and checks, and evaluates the shipped alert rules:
    the healthy balancer raises none of the alerts that would page; b2
    dies and XvsDestinationFailing fires for each of its services, then
    resolves when it returns; every dashboard expression returns data; and
    the scrape serves exactly the metrics docs/design.md's table lists."""
    lab, bals = fleet
    b = bals["bal1"]
    assert b.role() > 0
    b.start_bird()
    b.start_agent()
    wait_for(lambda: next_hops(lab) == [BALANCERS["bal1"]], timeout=30, what="bal1's VIP at the router")
    wait_for(lambda: next_hops(lab, VIP6) == [v6(FRONT6, BALANCERS["bal1"])], timeout=30, what="the IPv6 VIP")
    assert {whoami(lab, 26000 + i).stdout for i in range(20)} == set(BACKENDS)
    prom = Prometheus(lab, b.ns, tmp_path / "prometheus", ["127.0.0.1:9405"])
    prom.wait_scraped()
    time.sleep(3)                   # past every alert's (scaled) for:
    paging = ("XvsAgentDown", "XvsDataplaneDown", "XvsServiceDown", "XvsBirdDown", "XvsBgpSessionDown",
              "XvsVipNotAnnounced", "XvsAgentApplyFailing", "XvsDestinationFailing")
    assert [(a, prom.alerts(a)) for a in paging if prom.alerts(a)] == []

    died = time.monotonic()
    for p in servers(lab, "b2"):
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        lab.procs.remove(p)
    b2 = {("80", BACKENDS["b2"]), (str(ECHO_PORT), BACKENDS["b2"]), ("80", v6(FRONT6, BACKENDS["b2"]))}
    wait_for(lambda: {(a["port"], a["destination"]) for a in prom.alerts("XvsDestinationFailing")} == b2,
             timeout=FALL * INTERVAL + 15, what="XvsDestinationFailing for b2's three services")
    print("XvsDestinationFailing fired %.1fs after b2 died (for: scaled to 2s)" % (time.monotonic() - died))
    assert prom.alerts("XvsServiceDown") == []          # two of three destinations are enough

    # the live scrape, with a transition and an apply behind it, serves
    # exactly the documented metrics
    assert set(name for name, labels in b.metrics()) == documented_metrics()
    for title, expr in dashboard_exprs():
        assert prom.query(expr), "dashboard panel %r: %s returns no data" % (title, expr)

    back = time.monotonic()
    http_server(lab, "b2", tmp_path / "www" / "b2")
    echo_server(lab, "b2")
    wait_for(lambda: not prom.alerts("XvsDestinationFailing") and not prom.alerts("XvsDestinationFailing", "pending"),
             timeout=RISE * INTERVAL + 15, what="XvsDestinationFailing resolved")
    print("XvsDestinationFailing resolved %.1fs after b2 came back" % (time.monotonic() - back))
    assert prom.query('xvs_destination_transitions_total{destination="%s", port="80"}' % BACKENDS["b2"])[0][
        "value"][1] == "2"


def test_the_announcer_sets_exactly_its_own_routes():
    """Announcer.set leaves exactly the VIPs given (any iterable) and never
    touches a route of the same table that it did not make."""
    from ansible_collections.xvs.lb.plugins.module_utils import _announce
    with Lab("xn") as lab:
        ns = lab.add("bal")
        lab.sh(ns, "ip route add blackhole 203.0.113.99/32 table 4242 proto static")
        with inside(ns):
            a = _announce.Announcer(4242)
            assert a.set(iter([VIP, "203.0.113.11"])) == ([VIP, "203.0.113.11"], [])
            assert a.set(v for v in [VIP, "203.0.113.11"]) == ([], [])
            assert a.announced() == {VIP, "203.0.113.11"}
            assert a.set([VIP]) == ([], ["203.0.113.11"])
            assert a.set(()) == ([], [VIP])
        routes = lab.sh(ns, "ip route show table 4242").stdout
        assert routes.split() == ["blackhole", "203.0.113.99", "proto", "static"], routes
