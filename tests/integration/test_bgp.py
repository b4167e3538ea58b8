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
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _health, _layout, _loader, _netinfo
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, dest_address
from xvstest.lab import (BGP_BALANCERS as BALANCERS, CLIENT_NET_CLIENT as CLIENT, ECHO_PORT, FRONT6, ROUTER, VIP,
                         VIP6, Lab, build_bgp_lab, echo_server, http_server, inside, next_hops, v6, wait_for)
from xvstest.modules import BIN, ansible_env, cli_command, restore_command
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

    def run_role(self, *args):
        """ansible-playbook applying the role in this namespace, args added."""
        return subprocess.run(["ip", "netns", "exec", self.ns, os.path.join(BIN, "ansible-playbook"), "-i",
                               "localhost,", "-c", "local", "-e", json.dumps(self.vars), self.playbook] + list(args),
                              env=ansible_env(), capture_output=True, text=True, timeout=300, check=False)

    def role(self, *args):
        """Apply the role: its changed count; with args (ansible-playbook's),
        (changed, everything it printed)."""
        r = self.run_role(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "This host has no systemd: BIRD is configured but not started" in r.stdout
        changed = int(re.search(r"localhost\s+:.*changed=(\d+)", r.stdout).group(1))
        return (changed, r.stdout + r.stderr) if args else changed

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

    def module(self, name, args):
        """(exit status, result) of one module run as Ansible runs it, in
        this namespace with this balancer's pin root and state of record."""
        path = str(self.work / ("%s-args.json" % name))
        with open(path, "w") as f:
            json.dump({"ANSIBLE_MODULE_ARGS": dict({"bpffs": self.root, "state_file": self.state_file}, **args)}, f)
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-m",
                            "ansible_collections.xvs.lb.plugins.modules." + name, path],
                           env=ansible_env(), capture_output=True, text=True, timeout=300, check=False)
        try:
            return r.returncode, json.loads(r.stdout[r.stdout.index("{"):])
        except ValueError:
            raise AssertionError("module %s printed no JSON result:\n%s%s" % (name, r.stdout, r.stderr))

    def stop_bird(self):
        os.killpg(self.bird.pid, signal.SIGKILL)
        self.bird.wait()
        self.lab.procs.remove(self.bird)
        self.bird = None

    def close(self):
        if self.agent is not None:
            os.killpg(self.agent.pid, signal.SIGKILL)
            self.agent.wait()
            self.log.close()
        with inside(self.ns):
            _loader.detach("eth0")
        _loader.unpin_all(self.root)
        shutil.rmtree(self.root, ignore_errors=True)    # an old layout's pins, an upgrade's leftovers
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
    """Announcer.set leaves exactly the VIPs given (any iterable) in its
    table and the draining ones in the drain table (table + 1), moving a
    VIP between them without a moment in neither, and never touches a
    route of the same tables that it did not make."""
    from ansible_collections.xvs.lb.plugins.module_utils import _announce
    A, D = _announce.ANNOUNCED, _announce.DRAINING
    with Lab("xn") as lab:
        ns = lab.add("bal")
        lab.sh(ns, "ip route add blackhole 203.0.113.99/32 table 4242 proto static && "
                   "ip route add blackhole 203.0.113.98/32 table 4243 proto static")
        with inside(ns):
            a = _announce.Announcer(4242)
            assert a.set(iter([VIP, "203.0.113.11"])) == {VIP: (None, A), "203.0.113.11": (None, A)}
            assert a.set(v for v in [VIP, "203.0.113.11"]) == {}
            assert a.announced() == {VIP, "203.0.113.11"}
            assert a.set([VIP], draining=["203.0.113.11", VIP6]) == {"203.0.113.11": (A, D), VIP6: (None, D)}
            assert a.routes() == {VIP: A, "203.0.113.11": D, VIP6: D}
            assert a.set([VIP, VIP6]) == {"203.0.113.11": (D, None), VIP6: (D, A)}
            assert a.set(()) == {VIP: (A, None), VIP6: (A, None)}
        routes = lab.sh(ns, "ip route show table 4242").stdout + lab.sh(ns, "ip route show table 4243").stdout
        assert routes.split() == ["blackhole", "203.0.113.99", "proto", "static",
                                  "blackhole", "203.0.113.98", "proto", "static"], routes
        assert lab.sh(ns, "ip -6 route show table 4242").stdout + lab.sh(ns, "ip -6 route show table 4243").stdout == ""


# ---- planned maintenance and rolling upgrades under load ---------------------------
# the commit xvs.lb 0.2.0 was released from: data-plane ABI 1, IPv4 only, no agent
OLD_RELEASE = "a2fed5a1d2fb01e59086666b87a8708c3c438cd2"
ROUTER_CTL = "router-bird.ctl"
# Not wrk: every request here is a new connection from a new source port
# (a new flow for ECMP and the balancers, whatever the server's keep-alive),
# and each failure keeps its time, to be read against the router's timeline.
LOAD = r"""
import json, signal, socket, sys, time
vip, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
state = {"ok": 0, "failed": 0, "errors": []}
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
while not stop:
    try:
        s = socket.create_connection((vip, port), timeout=3)
        s.settimeout(3)
        s.sendall(b"GET /whoami HTTP/1.0\r\nHost: vip\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        if data.startswith(b"HTTP/1.0 200"):
            state["ok"] += 1
        else:
            state["failed"] += 1
            state["errors"].append("%.3f: %r" % (time.time(), data[:60]))
    except OSError as e:
        state["failed"] += 1
        state["errors"].append("%.3f: %s" % (time.time(), e))
    time.sleep(0.01)
with open(out, "w") as f:
    json.dump(state, f)
"""


class Load(object):
    """A load generator in the client's namespace: new HTTP connections to
    the VIP one after another, each from a new source port, counted."""

    def __init__(self, lab, tmp_path):
        self.lab, self.out = lab, str(tmp_path / "load.json")
        script = tmp_path / "load.py"
        script.write_text(LOAD)
        self.proc = lab.bg(lab.name("cli"), "/usr/bin/python3 %s %s 80 %s" % (script, VIP, self.out))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.lab.procs.remove(self.proc)
        with open(self.out) as f:
            return json.load(f)


class Held(object):
    """n long-lived echo connections through the VIP, each exercised every
    0.3 s from a thread: the ones that ever failed to echo are broken."""

    def __init__(self, lab, n=20, first_port=30000):
        self.conns, self.broken, self.rounds = [], {}, 0
        with inside(lab.name("cli")):
            for i in range(n):
                s = socket.create_connection((VIP, ECHO_PORT), timeout=5, source_address=(CLIENT, first_port + i))
                f = s.makefile("rb")
                self.conns.append((s, f, f.readline().strip().decode()))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.wait(0.3):
            for i, (s, f, name) in enumerate(self.conns):
                if i in self.broken:
                    continue
                try:
                    s.sendall(b"ping %d %d\n" % (i, self.rounds))
                    if f.readline() != b"ping %d %d\n" % (i, self.rounds):
                        self.broken[i] = "wrong echo"
                except OSError as e:
                    self.broken[i] = str(e)
            self.rounds += 1

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=30)
        for s, f, name in self.conns:
            s.close()
        return self.broken


def birdc(ctl, *command):
    """What BIRD at control socket ctl answers to command."""
    return subprocess.run(["birdc", "-s", ctl] + list(command), capture_output=True, text=True, timeout=10,
                          check=False).stdout


class RouteWatch(object):
    """The router's view of a VIP, polled from its BIRD every 0.1 s: a list
    of (time, {BGP protocol: carries GRACEFUL_SHUTDOWN?})."""

    def __init__(self, ctl, vip=VIP):
        self.ctl, self.vip, self.seen = ctl, vip, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now(self):
        out = birdc(self.ctl, "show", "route", "all", "for", self.vip)
        routes, current = {}, None
        for line in out.splitlines():
            head = re.search(r"^\S*\s+unicast \[(\w+) ", line)
            if head:
                current = head.group(1)
                routes[current] = False
            elif current and "BGP.community:" in line:
                routes[current] = "(65535,0)" in line
        return routes

    def _run(self):
        while not self.stopping.wait(0.1):
            self.seen.append((time.monotonic(), self.now()))

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=30)
        return self.seen

    def left_gracefully(self, proto):
        """The protocol's route carried GRACEFUL_SHUTDOWN before it was
        withdrawn, and came back without it."""
        states = [routes.get(proto) for t, routes in self.seen]     # None: withdrawn
        first_gone = states.index(None) if None in states else None
        return (first_gone is not None and True in states[:first_gone]
                and states[-1] is False), states


def old_release(tmp_path):
    """The collection of the 0.2.0 release, from this repository's history
    (git, which setup-host installs; a shallow clone without that commit
    fails here, loudly)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dest = tmp_path / "old" / "ansible_collections" / "xvs" / "lb"
    dest.mkdir(parents=True)
    subprocess.run("git -C %s archive %s | tar -x -C %s" % (shlex.quote(root), OLD_RELEASE, shlex.quote(str(dest))),
                   shell=True, check=True, timeout=120)
    return str(tmp_path / "old")


def run_old_release(b, old):
    """Give balancer b the data plane the 0.2.0 release makes for its
    IPv4 services: its own xvs_attach and xvs_services, its state of record
    aside (the balancer keeps today's, with the checks 0.2.0 did not have)."""
    with inside(b.ns):
        _loader.detach("eth0")
    _loader.unpin_all(b.root)
    plain = [dict((k, v) for k, v in svc.items() if k != "check") for svc in b.vars["xvs_services"]]
    common = {"bpffs": b.root, "state_file": str(b.work / "old-state.json")}
    book = str(b.work / "old.yml")
    with open(book, "w") as f:
        json.dump([{"hosts": "localhost", "gather_facts": False, "tasks": [
            {"xvs.lb.xvs_attach": dict(common, interfaces=["eth0"], mode="generic", sizes=dict(
                (k, v) for k, v in b.vars["xvs_sizes"].items() if k != "flow_table_size_v6"))},
            {"xvs.lb.xvs_services": dict(common, config=plain, state="overridden")}]}], f)
    env = dict(ansible_env(), ANSIBLE_COLLECTIONS_PATH=old, PYTHONPATH=old)
    r = subprocess.run(["ip", "netns", "exec", b.ns, os.path.join(BIN, "ansible-playbook"), "-i", "localhost,",
                        "-c", "local", book], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _dataplane.pinned_abi(b.root) == 1


def rolling_upgrade(lab, bals, tmp_path, extra=None):
    """The collection's rolling_upgrade playbook over both balancers, each
    host's modules run in its namespace (its Python through ip netns exec)."""
    hosts = {}
    for short, b in sorted(bals.items()):
        python = b.work / "python"
        python.write_text("#!/bin/sh\nexec ip netns exec %s /usr/bin/python3 \"$@\"\n" % b.ns)
        python.chmod(0o755)
        hosts[short] = dict(b.vars, ansible_connection="local", ansible_python_interpreter=str(python),
                            **(extra or {}))
    inventory = tmp_path / "fleet.json"
    inventory.write_text(json.dumps({"xvs_balancers": {"hosts": hosts}}))
    return subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", str(inventory), "xvs.lb.rolling_upgrade"],
                          env=ansible_env(), capture_output=True, text=True, timeout=900, check=False)


def test_rolling_upgrade_from_another_layout_under_load(fleet, tmp_path):
    """Two balancers run the data plane of the 0.2.0 release (another map
    layout) behind the router, with 20 long-lived connections through them
    and a load generator making new ones.  The collection's rolling_upgrade
    playbook takes each in turn out of the fleet (the router sees its route
    with GRACEFUL_SHUTDOWN before the withdrawal), upgrades its data plane
    in one run and takes it back: no long-lived connection breaks, no new
    request fails, and both end on the current layout, announced."""
    lab, bals = fleet
    for b in bals.values():
        b.vars["xvs_services"] = services()[:2]             # 0.2.0 knew no IPv6
        b.vars["xvs_maintenance_drain_timeout"] = 5           # an old data plane's counters are not read
        assert b.role() > 0
        run_old_release(b, old_release(tmp_path / b.short))
        b.start_bird()
        b.start_agent()
    wait_for(lambda: next_hops(lab) == sorted(BALANCERS.values()), timeout=30, what="two next hops")
    assert {whoami(lab, 20000 + i).stdout for i in range(40)} == set(BACKENDS)

    held = Held(lab)
    load = Load(lab, tmp_path)
    watch = RouteWatch(str(tmp_path / ROUTER_CTL))
    time.sleep(1)
    r = rolling_upgrade(lab, bals, tmp_path)
    time.sleep(1)
    watch.stop()
    traffic = load.stop()
    broken = held.stop()
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    assert broken == {}, "%d of 20 long-lived connections broke: %s" % (len(broken), broken)
    assert traffic["failed"] == 0 and traffic["ok"] > 100, traffic
    assert held.rounds > 10
    for short, b in bals.items():
        ok, states = watch.left_gracefully(short)
        assert ok, "%s: %s" % (short, states)
        assert _dataplane.pinned_abi(b.root) == _layout.ABI_VERSION
        assert "maintenance: every VIP withdrawn: drain_timeout 5s passed" in b.logged()
    assert next_hops(lab) == sorted(BALANCERS.values())
    # one at a time: never were both out
    assert all(routes for t, routes in watch.seen), [s for s in watch.seen if not s[1]][:3]
    print("rolling upgrade: %d new requests served, 0 failed; 20 long-lived connections exercised %d times"
          % (traffic["ok"], held.rounds))


def test_maintenance_drains_gracefully_and_survives_an_agent_restart_and_a_reboot(fleet, tmp_path):
    """xvs_maintenance takes bal1 out under load: the router sees its route
    with GRACEFUL_SHUTDOWN, new flows move to bal2, the agent withdraws once
    its own new-flow counter stops and the module returns then; no
    connection breaks.  bal1 stays out across an agent restart and a
    simulated reboot (pins, kernel tables and /run gone, the boot restore
    run), its checks running, the metrics and `xvs status` saying so; taken
    back in, it is announced and serves again."""
    lab, bals = fleet
    for b in bals.values():
        assert b.role() > 0
        b.start_bird()
        b.start_agent()
    wait_for(lambda: next_hops(lab) == sorted(BALANCERS.values()), timeout=30, what="two next hops")
    wait_for(lambda: next_hops(lab, VIP6) == BALANCERS6, timeout=30, what="two IPv6 next hops")
    b1 = bals["bal1"]
    held, load = Held(lab), Load(lab, tmp_path)
    watch = RouteWatch(str(tmp_path / ROUTER_CTL))
    time.sleep(1)
    start = time.monotonic()
    rc, res = b1.module("xvs_maintenance", {"state": "present", "drain_timeout": 30})
    took = time.monotonic() - start
    assert rc == 0 and res["changed"], res
    assert res["agent"] == {"maintenance": "withdrawn", "announced": {}}
    assert res["maintenance"]["drain_timeout"] == 30.0 and res["maintenance"]["drain_rate"] == 0.0
    assert next_hops(lab) == [BALANCERS["bal2"]] and next_hops(lab, VIP6) == [v6(FRONT6, BALANCERS["bal2"])]
    time.sleep(1)
    watch.stop()
    ok, states = watch.left_gracefully("bal1")
    assert not ok and True in states and states[-1] is None, states      # left gracefully, not back yet
    assert states[:states.index(None)].count(True) >= 1
    assert re.search(r"maintenance: every VIP withdrawn: the new-flow rate fell to 0\.0/s after [\d.]+s", b1.logged())
    assert took < 30, "the drain waited for its timeout (%.1fs): the rate never fell" % took
    print("maintenance: bal1 drained and withdrawn %.1fs after xvs_maintenance started" % took)
    m = b1.metrics()
    assert m[("xvs_maintenance", ())] == 1 and m[("xvs_vip_announced", (("vip", VIP),))] == 0
    assert m[("xvs_vip_draining", (("vip", VIP),))] == 0
    assert rc == 0 and b1.module("xvs_maintenance", {"state": "present", "drain_timeout": 30})[1]["changed"] is False

    # an agent restart keeps it out, and it checks
    assert b1.stop_agent() == 0
    b1.start_agent()
    wait_for(lambda: "maintenance: every VIP withdrawn: nothing was announced" in b1.logged(), timeout=10,
             what="the restarted agent in maintenance")
    checked = ("xvs_check_duration_seconds", (("destination", BACKENDS["b1"]), ("port", "80"), ("protocol", "tcp"),
                                              ("vip", VIP)))
    up = ("xvs_service_up", (("port", "80"), ("protocol", "tcp"), ("vip", VIP)))
    wait_for(lambda: b1.metrics().get(up) == 1 and checked in b1.metrics(), timeout=10, what="checks running")
    time.sleep(2)
    assert next_hops(lab) == [BALANCERS["bal2"]]

    # a simulated reboot: the agent and BIRD die, pins, kernel tables and /run go
    b1.stop_agent(signal.SIGKILL)
    b1.stop_bird()
    with inside(b1.ns):
        _loader.detach("eth0")
    _loader.unpin_all(b1.root)
    _health.remove(b1.state_file)
    lab.sh(b1.ns, "ip route flush table 4242; ip route flush table 4243; ip -6 route flush table 4242; "
                  "ip -6 route flush table 4243")
    for d in ("restore", "cli"):
        (b1.work / d).mkdir()
    r = subprocess.run(["ip", "netns", "exec", b1.ns] + restore_command(b1.work / "restore") + [b1.state_file],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    b1.start_bird()
    b1.start_agent()
    wait_for(lambda: b1.logged().count("maintenance: every VIP withdrawn: nothing was announced") == 2, timeout=10,
             what="the agent after the reboot in maintenance")
    time.sleep(3)                                      # past its first checks and BIRD's sessions
    assert next_hops(lab) == [BALANCERS["bal2"]]
    status = lab.sh(b1.ns, " ".join(cli_command(b1.work / "cli", b1.root, b1.state_file) + ["status"])).stdout
    assert "IN MAINTENANCE since " in status and "VIPs withdrawn" in status, status

    # back in
    rc, res = b1.module("xvs_maintenance", {"state": "absent"})
    assert rc == 0 and res["changed"] and res["maintenance"] is None, res
    wait_for(lambda: next_hops(lab) == sorted(BALANCERS.values()), timeout=10, what="bal1 back")
    wait_for(lambda: next_hops(lab, VIP6) == BALANCERS6, timeout=10, what="bal1 back over IPv6")
    time.sleep(1)
    traffic, broken = load.stop(), held.stop()
    assert broken == {} and traffic["failed"] == 0 and traffic["ok"] > 50, (broken, traffic)
    assert [f for f in b1.flows() if f["port"] == 80], "no new flow reached bal1 after it came back"
    assert b1.metrics()[("xvs_maintenance", ())] == 0


HOST_BIRD = """router id %(router_id)s;
protocol device { }
# the host's own: a prefix of its own, announced to the router over IPv6
protocol static host_own6 { ipv6; route 2001:db8:77::/64 blackhole; }
protocol bgp host_bgp6 {
  local as 65001; neighbor %(router6)s as 65000;
  ipv6 { import none; export where proto = "host_own6"; };
}
"""


def test_bird_include_mode_bfd_and_hidden_passwords(fleet, tmp_path):
    """Include mode: bal1's own BIRD configuration (its own protocols,
    announcing a prefix of its own) gains one include line, idempotently,
    and keeps its protocols running and announced beside xvs.lb's.  BFD
    with the router comes up, and bal1's link going down takes its VIP off
    the router within BFD's detection time, not BGP's hold time (240 s).
    And a BGP password is in bal2's configuration but not in the role's
    output, --diff -vvv included."""
    lab, bals = fleet
    b = bals["bal1"]
    host_conf, include = b.work / "host-bird.conf", str(b.work / "xvs-bird.conf")
    own = HOST_BIRD % {"router_id": BALANCERS["bal1"], "router6": v6(FRONT6, ROUTER)}
    host_conf.write_text(own)
    b.vars.update(xvs_bird_mode="include", xvs_bird_conf=str(host_conf), xvs_bird_include=include,
                  xvs_services=services()[:2])
    b.vars["xvs_bgp"] = dict(b.vars["xvs_bgp"], neighbors=[{"address": ROUTER, "remote_as": 65000, "bfd": True}])
    # a host configuration that xvs.lb's protocols would break is refused by
    # bird -p before anything is written
    host_conf.write_text(own + "filter xvs_export { accept; }\n")
    r = b.run_role()
    assert r.returncode != 0 and "Symbol 'xvs_export' already defined" in r.stdout, r.stdout[-3000:]
    assert not os.path.exists(include) and host_conf.read_text() == own + "filter xvs_export { accept; }\n"
    host_conf.write_text(own)
    assert b.role() > 0
    assert host_conf.read_text() == own + 'include "%s";\n' % include
    with open(include) as f:
        assert "bfd on;" in f.read()
    assert b.role() == 0
    b.start_bird()
    b.start_agent()
    wait_for(lambda: next_hops(lab) == [BALANCERS["bal1"]], timeout=30, what="bal1's VIP at the router")
    router = str(tmp_path / ROUTER_CTL)
    wait_for(lambda: "2001:db8:77::/64" in birdc(router, "show", "route", "protocol", "bal1_6"),
             timeout=30, what="the host's own prefix at the router")
    protocols = birdc(b.bird_socket, "show", "protocols")
    assert re.search(r"host_bgp6\s+BGP .* Established", protocols) and re.search(
        r"xvs_192_0_2_1\s+BGP .* Established", protocols), protocols
    wait_for(lambda: re.search(r"%s\s+eth0\s+Up" % re.escape(BALANCERS["bal1"]), birdc(router, "show", "bfd", "sessions")),
             timeout=15, what="BFD up")
    assert whoami(lab, 27000).returncode == 0

    start = time.monotonic()
    lab.sh(b.ns, "ip link set eth0 down")
    wait_for(lambda: next_hops(lab) == [], timeout=10, what="bal1's VIP gone from the router")
    took = time.monotonic() - start
    assert took < 2.0, "the router noticed after %.1fs" % took
    print("the router dropped bal1's VIP %.2fs after its link went down (BFD 3 x 100 ms)" % took)
    lab.sh(b.ns, "ip link set eth0 up")

    b2 = bals["bal2"]
    b2.vars["xvs_bgp"] = dict(b2.vars["xvs_bgp"], neighbors=[{"address": ROUTER, "remote_as": 65000,
                                                              "password": "s3cret-xvs"}])
    changed, out = b2.role("--diff", "-vvv")
    assert changed > 0 and "s3cret-xvs" not in out
    with open(b2.vars["xvs_bird_conf"]) as f:
        assert 'password "s3cret-xvs";' in f.read()
    assert oct(os.stat(b2.vars["xvs_bird_conf"]).st_mode & 0o777) == "0o640"
    b2.vars["xvs_bgp"]["neighbors"][0]["password"] = "n3w-s3cret"
    changed, out = b2.role("--diff", "-vvv")
    assert changed == 1 and "s3cret" not in out


def test_layout_upgrade_is_refused_without_the_option_and_rolled_back_when_it_fails(fleet, tmp_path):
    """Maps of the 0.2.0 release: xvs_attach refuses them as before without
    allow_layout_upgrade; with it and a program that does not compile, the
    old program is left attached with its pins; with it, one run upgrades
    (the record's services in the new maps, nothing set aside left) and a
    second changes nothing; without a state of record it changes nothing."""
    lab, bals = fleet
    b, b2 = bals["bal1"], bals["bal2"]
    old = old_release(tmp_path)
    for x in (b, b2):
        x.vars["xvs_services"] = services()[:2]
        assert x.role() > 0
        run_old_release(x, old)
    args = {"interfaces": ["eth0"], "mode": "generic", "sizes": b.vars["xvs_sizes"]}
    rc, res = b.module("xvs_attach", args)
    assert rc == 1 and "holds maps of data-plane ABI 1 and this version of xvs.lb needs ABI %d" % _layout.ABI_VERSION \
        in res["msg"], res
    old_id = _loader.pinned_prog_id(b.root)
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    rc, res = b.module("xvs_attach", dict(args, allow_layout_upgrade=True, source=str(broken)))
    assert rc == 1 and "compiling or loading" in res["msg"], res
    assert _dataplane.pinned_abi(b.root) == 1 and _loader.pinned_prog_id(b.root) == old_id
    assert not os.path.exists(os.path.join(b.root, _loader.UPGRADE_ASIDE))
    with inside(b.ns):
        assert _netinfo.xdp_interfaces(old_id) == {"eth0": "generic"}

    rc, res = b.module("xvs_attach", dict(args, allow_layout_upgrade=True))
    assert rc == 0 and res["changed"], res
    assert _dataplane.pinned_abi(b.root) == _layout.ABI_VERSION
    assert not os.path.exists(os.path.join(b.root, _loader.UPGRADE_ASIDE))
    with _dataplane.DataPlane(b.root) as dp:
        assert sorted((s["address"], s["port"], len(s["destinations"])) for s in dp.services()) == [
            (VIP, 80, 3), (VIP, ECHO_PORT, 3)]
    for again in (dict(args, allow_layout_upgrade=True), args):
        rc, res = b.module("xvs_attach", again)
        assert rc == 0 and res["changed"] is False, res

    os.unlink(b2.state_file)
    rc, res = b2.module("xvs_attach", dict(args, allow_layout_upgrade=True))
    assert rc == 1 and "has no state of record to put the services back from; nothing was changed" in res["msg"], res
    assert _dataplane.pinned_abi(b2.root) == 1
