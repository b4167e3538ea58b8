"""End to end with real ansible-core and real traffic: ansible-playbook and
ansible run the modules inside the balancer's namespace (bpffs root outside
/sys), and a client in its own namespace talks to the VIP."""
import json
import os
import re
import stat
import subprocess

import pytest

from ansible_collections.xvs.lb.plugins.action import xvs_attach as xvs_attach_action
from xvstest.lab import ECHO_PORT, VIP, curl, dsr_lab, echo_connect, inside
from xvstest.modules import BIN, ansible_env
from xvstest.packets import dump_maps

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22", "b3": "192.0.2.23"}


class Ansible(object):
    def __init__(self, lab, root, state_file):
        self.lab, self.root, self.state_file = lab, root, state_file
        self.library = os.path.join(os.path.dirname(state_file), "lib", "xvs-lb.zip")
        self.env = ansible_env()

    def _run(self, argv):
        return subprocess.run(["ip", "netns", "exec", self.lab.name("bal")] + argv, env=self.env,
                              capture_output=True, text=True, timeout=300, check=False)

    def playbook(self, destinations, *flags):
        extra = json.dumps({"bpffs": self.root, "state_file": self.state_file, "vip": VIP,
                            "destinations": destinations, "library": self.library})
        r = self._run([os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
                       "-e", extra, os.path.join(HERE, "playbooks", "balancer.yml")] + list(flags))
        assert r.returncode == 0, r.stdout + r.stderr
        return int(re.search(r"localhost\s+:.*changed=(\d+)", r.stdout).group(1)), r.stdout

    def module(self, name, args, ok=True):
        args = dict({"bpffs": self.root, "state_file": self.state_file}, **args)
        r = self._run([os.path.join(BIN, "ansible"), "localhost", "-i", "localhost,", "-c", "local",
                       "-m", "xvs.lb." + name, "-a", json.dumps(args), "-o"])
        assert (r.returncode == 0) == ok, r.stdout + r.stderr
        return r.stdout


def dests(**weights):
    return [{"address": BACKENDS[n], "weight": weights.get(n, 1)} for n in sorted(BACKENDS)]


@pytest.fixture
def lab(tmp_path):
    with dsr_lab("xa", tmp_path, BACKENDS) as lab:
        yield lab


def test_playbook_attach_serve_drain_remove_detach(lab, bpffs, tmp_path):
    root = os.path.join(bpffs, "ansible")
    ans = Ansible(lab, root, str(tmp_path / "state.json"))
    held = []
    try:
        changed = ans.playbook(dests())[0]
        assert changed == 2   # attach, and the services, with bpffs and state_file from the group
        with open(ans.state_file) as f:
            assert [s["port"] for s in json.load(f)["services"]] == [80, ECHO_PORT]
        # the restore's library: the action plugin's bytes, root-only, not rewritten unchanged
        with open(ans.library, "rb") as f:
            assert f.read() == xvs_attach_action.library()
        assert stat.S_IMODE(os.stat(ans.library).st_mode) == 0o600
        written = os.stat(ans.library).st_mtime_ns

        seen = {curl(lab, "whoami", 21000 + i).stdout for i in range(30)}
        assert seen == set(BACKENDS)

        # idempotent: the same playbook changes nothing
        assert ans.playbook(dests())[0] == 0
        assert os.stat(ans.library).st_mtime_ns == written
        # a library that differs (an older collection's, or damaged) is replaced
        with open(ans.library, "ab") as f:
            f.write(b"stale")
        assert ans.playbook(dests())[0] == 1
        with open(ans.library, "rb") as f:
            assert f.read() == xvs_attach_action.library()

        # bad input: a one-line error naming the option and value, nothing changed
        with inside(lab.name("bal")):
            before = dump_maps(root)
        svc = {"address": VIP, "port": 80}
        for args, msg in [
                (dict(svc, address="203.0.113.300"), "address=203.0.113.300: not an IPv4"),
                (dict(svc, port=70000), "port=70000: must be a port number"),
                (dict(svc, destinations=[{"address": "198.51.100.9"}]),
                 "destinations[0].address=198.51.100.9: destination 198.51.100.9 is not on-link"),
                (dict(svc, destinations=[{"address": "192.0.2.99"}]),
                 "destinations[0].address=192.0.2.99: cannot resolve the MAC address")]:
            assert msg in ans.module("xvs_service", args, ok=False)
        attach = {"interfaces": ["eth0"], "sizes": {"flow_table_size": 65536, "max_services": 8}}
        assert "interfaces: nosuch0 does not exist" in ans.module(
            "xvs_attach", dict(attach, interfaces=["eth0", "nosuch0"]), ok=False)
        assert "allow the flow table reset explicitly" in ans.module(
            "xvs_attach", dict(attach, sizes={"flow_table_size": 8192, "max_services": 8}),
            ok=False)
        assert "maglev_table_size=65536: must be a prime" in ans.module(
            "xvs_attach", dict(attach, sizes={"maglev_table_size": 65536}), ok=False)
        with inside(lab.name("bal")):
            assert dump_maps(root) == before
        assert "is not attached here" in ans.module(
            "xvs_service", dict(svc, bpffs=root + "_none"), ok=False)

        # check mode with diff: reports the change, shows it, changes nothing
        with inside(lab.name("bal")):
            before = dump_maps(root)
        changed, out = ans.playbook(dests(b3=2), "--check", "--diff")
        assert changed == 1
        assert re.search(r'^\+\s+"weight": 2', out, re.M), out
        with inside(lab.name("bal")):
            assert dump_maps(root) == before

        # a changed option reloads the program: a new program, the same
        # services, and a connection held across the reload keeps working
        s0, f0, name0 = echo_connect(lab.name("cli"))
        old = json.loads(ans.module("xvs_info", {}).split("=>", 1)[1])
        out = ans.module("xvs_attach", {"interfaces": ["eth0"], "sizes": {
            "flow_table_size": 65536, "max_services": 8, "tcp_timeout": 600}})
        assert "CHANGED" in out
        new = json.loads(ans.module("xvs_info", {}).split("=>", 1)[1])
        assert new["attachment"]["program"]["id"] != old["attachment"]["program"]["id"]
        assert new["attachment"]["sizes"]["tcp_timeout"] == 600
        strip = [[dict(d, counters=None) for d in sv["destinations"]] for sv in new["services"]]
        assert strip == [[dict(d, counters=None) for d in sv["destinations"]]
                         for sv in old["services"]]
        s0.sendall(b"across the reload\n")
        assert f0.readline() == b"across the reload\n", "connection to %s broke" % name0
        s0.close()

        # drain b1 on the echo service: a held connection to it keeps working
        conns = [echo_connect(lab.name("cli")) for i in range(12)]
        held = [c for c in conns if c[2] == "b1"]
        assert held, "no connection reached b1: %s" % [c[2] for c in conns]
        s, f = held[0][:2]
        drain = {"service_address": VIP, "service_port": ECHO_PORT, "address": BACKENDS["b1"]}
        out = ans.module("xvs_destination", dict(drain, weight=0))
        assert "CHANGED" in out and '"weight": 0' in out
        s.sendall(b"still here\n")
        assert f.readline() == b"still here\n"
        fresh = [echo_connect(lab.name("cli")) for i in range(20)]
        assert "b1" not in {c[2] for c in fresh}
        assert {c[2] for c in fresh} == {"b2", "b3"}
        for c in conns + fresh:
            c[0].close()

        # remove it: new connections never reach it
        out = ans.module("xvs_destination", dict(drain, state="absent"))
        assert "CHANGED" in out
        assert "b1" not in {echo_connect(lab.name("cli"))[2] for i in range(20)}

        # the info module sees two destinations on the echo service and counts
        info = ans.module("xvs_info", {"source_prefixes": 3})
        data = json.loads(info.split("=>", 1)[1])
        # every forwarded packet came from the client's /20
        assert [p["prefix"] for p in data["source_prefixes"]] == ["192.0.0.0/20"]
        assert data["source_prefixes"][0]["packets"] >= data["counters"]["new_flows"]
        echo = [s for s in data["services"] if s["port"] == ECHO_PORT][0]
        assert sorted(d["address"] for d in echo["destinations"]) == [BACKENDS["b2"], BACKENDS["b3"]]
        assert data["counters"]["new_flows"] >= 30 + 12 + 20 + 20
        assert data["attachment"]["interfaces"] == {"eth0": "native"}

        # detach: the VIP stops answering and the pins are gone
        out = ans.module("xvs_attach", {"state": "absent"})
        assert "CHANGED" in out
        assert curl(lab, "whoami", timeout=2).returncode != 0
        assert not os.path.exists(root)
    finally:
        for c in held:
            c[0].close()
        with inside(lab.name("bal")):
            from ansible_collections.xvs.lb.plugins.module_utils import _loader
            _loader.detach("eth0")
            _loader.unpin_all(root)
