"""The xvs role's units under a real systemd: Debian 12's systemd booted as
PID 1 of a systemd-nspawn container (xvstest.nspawn) on the balancer's
network namespace of the routed BGP lab, the role applied inside by
ansible-playbook, everything run through the container's own systemd.

    client -- router (BIRD, AS 65000) -- bridge -- bal1: the container
                                             +-- b1, b2: HTTP, VIP on lo

Proved here, with what a balancer host has: the agent reaches READY under
Type=notify; kill -9 runs ExecStopPost (the VIP withdrawn at the router)
and Restart= brings it back (announced again); a stopped (SIGSTOP) agent
is killed by the watchdog and restarted; the restore runs before the
agent; bird.service runs with the role's drop-in; a drain made by a module
survives `systemctl reboot`; and a boot with twenty recorded destinations
that do not answer (in one service) brings every service up with those
that do, announces the other service's VIP, and never trips the watchdog.
The watchdog is set to 6 s by a drop-in here (the unit's is 30 s): the
same mechanism, a stricter test of the agent's keepalives, a shorter run.
"""
import json
import os
import re
import subprocess
import time

import pytest

from xvstest.lab import (BGP_BALANCERS, FRONT6, ROUTER, VIP, Lab, build_bgp_lab,
                         next_hops, v6, wait_for)
from xvstest.nspawn import Container

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Inside, the checkout is bound at a path of its own: wherever it is on the
# host (/tmp, say, which the container's systemd mounts a tmpfs over), and
# its virtual environment is run from there by its python (the scripts'
# #! lines name the host's path).
COLLECTIONS = "/xvs"
INSIDE = COLLECTIONS + "/ansible_collections/xvs/lb"
PYTHON = INSIDE + "/.venv/bin/python"
BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22"}
VIP2 = "203.0.113.11"                   # the service whose destinations are dead at boot
DEAD = ["192.0.2.%d" % i for i in range(100, 120)]
BPFFS = "/run/xvs/bpffs/xvs"
WATCHDOG = 6
CHECK = {"type": "http", "path": "/whoami", "interval": 0.5, "timeout": 0.5, "fall": 2, "rise": 2}
ADDR = BGP_BALANCERS["bal1"]


def role_vars():
    return {"xvs_interfaces": ["eth0"], "xvs_mode": "generic", "xvs_bpffs": BPFFS,
            "xvs_install_packages": False, "xvs_purge_services": True,
            "xvs_sizes": {"flow_table_size": 65536, "flow_table_size_v6": 65536, "max_services": 8},
            "xvs_services": [{"address": VIP, "port": 80, "check": CHECK,
                              "destinations": [{"address": a} for a in sorted(BACKENDS.values())]}],
            "xvs_metrics_listen": "127.0.0.1:9405",
            "xvs_bgp": {"local_as": 65001, "router_id": ADDR, "neighbors": [{"address": ROUTER, "remote_as": 65000}]}}


class Balancer(object):
    """The container on bal1's namespace, and what a test does in it."""

    def __init__(self, lab, tmp_path):
        self.lab, self.ns = lab, lab.name("bal1")
        self.c = Container(lab.tag + "c", self.ns, binds=["%s:%s" % (ROOT, INSIDE)])
        self.n = 0

    def env(self):
        return {"HOME": "/root", "ANSIBLE_COLLECTIONS_PATH": COLLECTIONS, "PYTHONPATH": COLLECTIONS,
                "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3", "ANSIBLE_LOCALHOST_WARNING": "false",
                "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false", "ANSIBLE_NOCOLOR": "1"}

    def put(self, inside, text):
        path = self.c.path(inside)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def role(self, variables=None, ok=True):
        """ansible-playbook with the role, inside, as a unit of its
        systemd: its changed count, or (ok=False) its output, failed."""
        self.put("/root/role.yml", json.dumps([{"hosts": "localhost", "gather_facts": False,
                                                "tasks": [{"ansible.builtin.include_role": {"name": "xvs.lb.xvs"}}]}]))
        self.put("/root/vars.json", json.dumps(variables or role_vars()))
        r = self.c.sh("%s -m ansible playbook -i localhost, -c local -e @/root/vars.json /root/role.yml"
                      % PYTHON, env=self.env(), check=False, timeout=600)
        if not ok:
            assert r.returncode != 0, r.stdout[-3000:]
            return r.stdout + r.stderr
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        return int(re.search(r"localhost\s+:.*changed=(\d+)", r.stdout).group(1))

    def module(self, name, args):
        """A module run inside (as Ansible runs it: the file with a JSON
        arguments file), its JSON result."""
        self.n += 1
        self.put("/root/args-%d.json" % self.n, json.dumps({"ANSIBLE_MODULE_ARGS": dict({"bpffs": BPFFS}, **args)}))
        r = self.c.sh("%s -m ansible_collections.xvs.lb.plugins.modules.%s /root/args-%d.json"
                      % (PYTHON, name, self.n), env=self.env(), check=False)
        assert "{" in r.stdout, r.stdout + r.stderr
        result = json.loads(r.stdout[r.stdout.index("{"):])
        assert r.returncode == 0, result
        return result

    def show(self, unit, *props):
        return self.c.show(unit, *props)

    def agent_ready(self):
        s = self.show("xvs-agent.service", "ActiveState", "SubState")
        return (s["ActiveState"], s["SubState"]) == ("active", "running")

    def restarts(self):
        return int(self.show("xvs-agent.service", "NRestarts")["NRestarts"])

    def metrics(self):
        r = self.lab.sh(self.ns, "curl -sf http://127.0.0.1:9405/metrics", check=False)
        return r.stdout if r.returncode == 0 else ""

    def remake_netns(self):
        """What a power cycle leaves of the balancer's links: a fresh
        namespace with a new eth0 on the bridge (the NIC's MAC), addressed,
        no XDP."""
        mac = self.lab.sh(self.ns, "cat /sys/class/net/eth0/address").stdout.strip()
        subprocess.run(["ip", "netns", "del", self.ns], check=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        sw = self.lab.name("sw")
        self.lab.sh(self.ns, "ip link set lo up")
        self.lab.veth(self.ns, "eth0", sw, "p-bal1")
        self.lab.sh(self.ns, "ip link set eth0 address %s" % mac)
        self.lab.sh(sw, "ip link set p-bal1 master br0")
        self.lab.sh(self.ns, "ip addr add %s/24 dev eth0 && ip -6 addr add %s/64 dev eth0 nodad"
                    % (ADDR, v6(FRONT6, ADDR)))

    def reboot(self):
        self.c.reboot(self.remake_netns)


PORTS = iter(range(23000, 30000, 20))


def served(lab, n=20):
    """The backends that answered n new connections through the VIP (from
    client ports of their own: a port the client used last may be in its
    TIME_WAIT)."""
    out = set()
    base = next(PORTS)
    for i in range(n):
        r = lab.sh(lab.name("cli"), "curl -sS --max-time 3 --local-port %d http://%s/whoami" % (base + i, VIP),
                   check=False)
        out.add(r.stdout if r.returncode == 0 else "failed: " + r.stderr.strip())
    return out


def seen_withdrawn(lab, still, timeout=30):
    """Whether the router lost every next hop for VIP at some point while
    still() holds, watched every 50 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and still():
        if next_hops(lab) == []:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def balancer(tmp_path):
    with Lab("xs") as lab:
        build_bgp_lab(lab, tmp_path, BACKENDS)
        b = Balancer(lab, tmp_path)
        try:
            b.c.prepare()
            b.c.boot()
            yield b
        finally:
            b.c.close()


def test_the_units_under_a_real_systemd(balancer):
    b, lab = balancer, balancer.lab
    # the container's /sys/fs/bpf is no bpf filesystem: one message, naming xvs_bpffs
    out = b.role(dict(role_vars(), xvs_bpffs="/sys/fs/bpf/xvs"), ok=False)
    assert "xvs_bpffs=/sys/fs/bpf/xvs: /sys/fs/bpf is not a mounted bpf filesystem here" in out, out
    assert "Could not find the requested service" not in out
    assert b.role() > 0
    # the test's stricter watchdog (see the module docstring)
    b.put("/etc/systemd/system/xvs-agent.service.d/test-watchdog.conf", "[Service]\nWatchdogSec=%d\n" % WATCHDOG)
    b.c.sh("systemctl daemon-reload && systemctl restart xvs-agent.service", direct=True)

    # Type=notify: active only once the agent said READY=1; bird.service with the drop-in
    wait_for(b.agent_ready, timeout=30, what="xvs-agent READY")
    assert b.show("xvs-agent.service", "Type", "WatchdogUSec")["WatchdogUSec"] in ("6s", str(WATCHDOG * 10 ** 6))
    bird = b.show("bird.service", "ActiveState", "DropInPaths")
    assert bird["ActiveState"] == "active" and "/etc/systemd/system/bird.service.d/xvs.conf" in bird["DropInPaths"]
    wait_for(lambda: next_hops(lab) == [ADDR], timeout=60, what="the VIP announced to the router")
    assert served(lab) == set(BACKENDS)
    # the journal: the agent's lines under its own identifier, at their priority
    assert "xvs-agent: VIP %s announced" % VIP in b.c.sh(
        "journalctl --no-pager -t xvs-agent -p notice", direct=True).stdout

    # kill -9: ExecStopPost withdraws the VIP, Restart= brings the agent back, it announces again
    b.c.sh("systemctl kill --signal=KILL xvs-agent.service", direct=True)
    assert seen_withdrawn(lab, lambda: b.restarts() == 0 or not b.agent_ready()), "the VIP was never withdrawn"
    wait_for(lambda: b.restarts() == 1 and b.agent_ready(), timeout=30, what="the agent restarted")
    wait_for(lambda: next_hops(lab) == [ADDR], timeout=60, what="the VIP announced again")
    assert "withdrawn: the agent is stopping" in b.c.journal("xvs-agent.service")

    # SIGSTOP: the watchdog kills the hung agent, ExecStopPost withdraws, Restart= brings it back
    b.c.sh("systemctl kill --signal=STOP xvs-agent.service", direct=True)
    wait_for(lambda: b.restarts() == 2 and b.agent_ready(), timeout=WATCHDOG + 30, what="the watchdog restart")
    assert "Watchdog timeout" in b.c.journal("xvs-agent.service")
    wait_for(lambda: next_hops(lab) == [ADDR], timeout=60, what="the VIP announced after the watchdog")

    # a drain made by a module survives a reboot; the restore runs before the agent
    drained = b.module("xvs_destination", {"service_address": VIP, "service_port": 80,
                                           "address": BACKENDS["b2"], "weight": 0})
    assert drained["changed"] and drained["destination"]["state"] == "drained"
    b.reboot()
    wait_for(b.agent_ready, timeout=30, what="xvs-agent READY after the reboot")
    restore = b.show("xvs-restore.service", "Result", "ExecMainExitTimestampMonotonic")
    agent = b.show("xvs-agent.service", "ExecMainStartTimestampMonotonic")
    assert restore["Result"] == "success"
    assert 0 < int(restore["ExecMainExitTimestampMonotonic"]) <= int(agent["ExecMainStartTimestampMonotonic"])
    info = b.module("xvs_info", {})
    assert [(d["address"], d["weight"], d["state"]) for d in info["services"][0]["destinations"]] == [
        (BACKENDS["b1"], 1, "up"), (BACKENDS["b2"], 0, "drained")]
    wait_for(lambda: next_hops(lab) == [ADDR], timeout=60, what="the VIP announced after the reboot")
    assert served(lab) == {"b1"}

    # twenty destinations that do not answer, recorded in a second service (as a
    # record from before they died holds them), and a reboot
    with open(b.c.path("/etc/xvs/state.json")) as f:
        record = json.load(f)
    record["services"].append({"address": VIP2, "port": 80, "protocol": "tcp", "sticky": False, "check": CHECK,
                               "destinations": [{"address": a, "weight": 1} for a in DEAD]})
    b.put("/etc/xvs/state.json", json.dumps(record))
    b.reboot()
    wait_for(lambda: next_hops(lab) == [ADDR], timeout=60, what="VIP announced beside twenty dead destinations")
    assert served(lab) == {"b1"}
    restore = b.show("xvs-restore.service", "Result", "NRestarts")
    assert (restore["Result"], restore["NRestarts"]) == ("success", "0")
    warned = b.c.sh("journalctl --no-pager -b -t xvs-restore -p warning", direct=True).stdout
    assert all("cannot resolve the MAC address of %s " % a in warned for a in DEAD), warned
    # each line reached the journal when it was written: the program's line before the
    # one shared wait for the dead destinations, their warnings after it
    journal = re.findall(r"^\[\s*([\d.]+)\] \S+ xvs-restore\[\d+\]: (.*)$", b.c.sh(
        "journalctl --no-pager -b -o short-monotonic -t xvs-restore", direct=True).stdout, re.M)
    stamps = dict((what, [float(t) for t, line in journal if what in line])
                  for what in ("xvs: program loaded", "cannot resolve the MAC address"))
    assert len(stamps["xvs: program loaded"]) == 1 and len(stamps["cannot resolve the MAC address"]) == len(DEAD)
    assert stamps["xvs: program loaded"][0] < min(stamps["cannot resolve the MAC address"])
    info = b.module("xvs_info", {})
    assert sorted(u["destination"] for u in info["unresolved"]) == DEAD
    # the operator's command the role installed shows the same
    status = b.c.sh("/usr/local/sbin/xvs status").stdout
    assert re.search(r"^  -> %s +1 +1 up +\d+$" % re.escape(BACKENDS["b1"]), status, re.M), status
    assert all(re.search(r"^  -> %s +- +1 unresolved +0$" % re.escape(a), status, re.M) for a in DEAD), status
    assert [(s["address"], s["destinations"]) for s in info["services"] if s["address"] == VIP2] == [(VIP2, [])]
    text = b.metrics()
    for a in DEAD[:3]:
        assert ('xvs_destination_state{destination="%s",port="80",protocol="tcp",state="unresolved",vip="%s"} 1.0'
                % (a, VIP2)) in text
    # the agent kept running on its own, its checks of the dead ones in flight, no watchdog kill
    time.sleep(2 * WATCHDOG)
    assert b.restarts() == 0 and b.agent_ready()
    assert "Watchdog timeout" not in b.c.journal("xvs-agent.service", "-b")
    assert next_hops(lab, VIP2) == []                # its service is down: never announced
