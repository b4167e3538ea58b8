"""Day-2 operations with real traffic through real XDP: live flows per
destination (the `xvs` command as the role installs it, xvs_info and the
metrics' source agree with the connections open), a drain waited for until
its connections are gone (wait_drained) or failed at its timeout naming
what is left, and the share of the Maglev table a change moves, against a
brute-force comparison of the tables before and after."""
import json
import os
import subprocess
import threading
import time

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _layout as L, _loader, _maglev
from xvstest.lab import ECHO_PORT, VIP, dsr_lab, echo_connect, inside
from xvstest.modules import Modules, cli_command

BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22", "b3": "192.0.2.23"}
NAMES = dict((v, k) for k, v in BACKENDS.items())
TCP_TIMEOUT = 3          # s a closed (or idle) connection's record stays live: short, so drains end
CONNECTIONS = 12


class Balancer(object):
    def __init__(self, lab, bpffs, tmp_path):
        self.lab, self.ns = lab, lab.name("bal")
        self.mods = Modules(self.ns, os.path.join(bpffs, "ops"))
        self.xvs = cli_command(tmp_path, self.mods.root, self.mods.state_file)

    def call(self, name, args, ok=True):
        rc, res = self.mods.call(name, args)
        assert (rc == 0) == ok, res
        return res

    def cli(self, *args):
        """(exit status, stdout, stderr) of the xvs command in the balancer's namespace."""
        r = subprocess.run(["ip", "netns", "exec", self.ns] + self.xvs + list(args), capture_output=True,
                           text=True, timeout=60, check=False)
        return r.returncode, r.stdout, r.stderr

    def status(self):
        rc, out, err = self.cli("status", "--json")
        assert rc == 0, err
        return json.loads(out)

    def close(self):
        with inside(self.ns):
            _loader.detach("eth0")
        _loader.unpin_all(self.mods.root)
        self.mods.close()


@pytest.fixture
def balancer(bpffs, tmp_path):
    with dsr_lab("xo", tmp_path, BACKENDS) as lab:
        b = Balancer(lab, bpffs, tmp_path)
        try:
            b.call("xvs_attach", {"interfaces": ["eth0"], "sizes": {
                "flow_table_size": 65536, "max_services": 8, "tcp_timeout": TCP_TIMEOUT}})
            b.call("xvs_services", {"config": [{"address": VIP, "port": ECHO_PORT, "destinations": [
                {"address": a} for a in sorted(BACKENDS.values())]}]})
            yield b
        finally:
            b.close()


def flows_of(status):
    return dict((d["address"], d["active_flows"]) for s in status["services"] for d in s["destinations"])


def keep_talking(conns, stop):
    """Send a line on each connection every 0.5 s, so their records stay live."""
    while not stop.is_set():
        for s, f, dummy in conns:
            try:
                s.sendall(b"x\n")
                f.readline()
            except OSError:
                pass
        stop.wait(0.5)


def test_live_flows_per_destination_and_a_drain_waited_for(balancer):
    b = balancer
    conns = [echo_connect(b.lab.name("cli")) for dummy in range(CONNECTIONS)]
    opened = dict((a, sum(1 for c in conns if c[2] == NAMES[a])) for a in BACKENDS.values())
    assert sum(opened.values()) == CONNECTIONS and all(opened.values()), opened
    stop = threading.Event()
    talker = threading.Thread(target=keep_talking, args=(conns, stop), daemon=True)
    talker.start()
    try:
        # xvs status (the role's command), xvs_info and xvs flows all count what is open
        st = b.status()
        assert flows_of(st) == opened
        assert [d["state"] for d in st["services"][0]["destinations"]] == ["up"] * 3
        assert st["services"][0]["digest"] == _maglev.digest(_maglev.build(
            [(a, 1) for a in BACKENDS.values()], 65537))
        info = b.call("xvs_info", {})
        assert dict((d["address"], d["active_flows"]) for d in info["services"][0]["destinations"]) == opened
        rc, out, err = b.cli("flows", "--json", "--list", "--service", "%s:%d/tcp" % (VIP, ECHO_PORT))
        flows = json.loads(out)
        assert rc == 0 and flows["total"] == CONNECTIONS and len(flows["records"]) == CONNECTIONS
        assert sorted(r["client_port"] for r in flows["records"]) == sorted(c[0].getsockname()[1] for c in conns)
        rc, out, err = b.cli()                       # the default: status as text
        assert rc == 0 and "%s:%d" % (VIP, ECHO_PORT) in out
        for a in BACKENDS.values():
            assert any(line.split()[:2] == ["->", a] and line.split()[-1] == str(opened[a])
                       for line in out.splitlines()), out

        # drain b2 and wait: its connections keep talking, so the wait fails at its timeout
        b2 = BACKENDS["b2"]
        drain = {"service_address": VIP, "service_port": ECHO_PORT, "address": b2, "weight": 0}
        res = b.call("xvs_destination", dict(drain, wait_drained={"timeout": 2, "max_flows": 0}), ok=False)
        assert "wait_drained: after 2s, %s:%d/tcp destination %s still has %d live flow(s)" % (
            VIP, ECHO_PORT, b2, opened[b2]) in res["msg"], res
        assert b.status()["services"][0]["destinations"][1]["state"] == "drained"
        # its clients finish: the wait returns once their records are idle past the TCP timeout
        threading.Timer(1.0, lambda: [(c[1].close(), c[0].close()) for c in conns if c[2] == "b2"]).start()
        start = time.monotonic()
        res = b.call("xvs_destination", dict(drain, wait_drained={"timeout": 30, "max_flows": 0}))
        assert not res["changed"] and res["drained"] == [{"address": VIP, "port": ECHO_PORT, "protocol": "tcp",
                                                          "destination": b2, "active_flows": 0}]
        assert time.monotonic() - start >= 1.0           # it waited for them
        # the other connections were never disturbed
        assert flows_of(b.status()) == dict(opened, **{b2: 0})
        # check mode does not wait
        res = b.call("xvs_destination", dict(drain, wait_drained={"timeout": 30}, _ansible_check_mode=True))
        assert "drained" not in res
    finally:
        stop.set()
        talker.join()
        for c in conns:
            c[1].close()
            c[0].close()


def test_exit_status_and_help(balancer, tmp_path):
    b = balancer
    rc, out, err = b.cli("--help")
    assert rc == 0 and "xvs status --rate 2" in out and "exit status" in out
    rc, out, err = b.cli("--version")
    assert rc == 0 and out == "xvs.lb %s (data-plane ABI %d)\n" % (L.VERSION, L.ABI_VERSION)
    assert b.cli("--stats", "--rate", "1")[0] == 2           # one or the other
    assert b.cli("flows", "--service", "nonsense")[0] == 2
    rc, out, err = b.cli("--bpffs", b.mods.root + "_none")
    assert rc == 1 and err.startswith("xvs: ") and "not attached here" in err and out == ""
    rc, out, err = b.cli("status", "--rate", "0.5", "--json")
    assert rc == 0 and set(json.loads(out)["services"][0]["rates"]) == {"packets", "bytes", "new_flows"}
    rc, out, err = b.cli("--stats")
    assert rc == 0 and "NewFlows" in out


def positions(weights):
    return _maglev.build(sorted(weights.items()), 65537)


def test_moved_is_the_share_of_the_table_that_changes(balancer):
    """Each run returns, per service it writes, the share of the Maglev
    table whose destination changes: compared here with the two tables
    built and compared position by position, and with the maps."""
    b = balancer
    before = dict((a, 1) for a in BACKENDS.values())
    cases = [dict(before, **{BACKENDS["b1"]: 3}),                       # a weight change
             dict(before, **{BACKENDS["b1"]: 3, "192.0.2.24": 1}),     # an addition
             dict((a, w) for a, w in before.items() if a != BACKENDS["b3"])]
    b.lab.sh(b.ns, "ip neigh replace 192.0.2.24 lladdr 02:00:c0:00:02:18 dev eth0 nud permanent")
    current = before
    for want in cases:
        old, new = positions(current), positions(want)
        share = sum(1 for x, y in zip(old, new) if x != y) / 65537.0
        config = {"config": [{"address": VIP, "port": ECHO_PORT, "destinations": [
            {"address": a, "weight": w} for a, w in sorted(want.items())]}], "state": "replaced"}
        checked = b.call("xvs_services", dict(config, _ansible_check_mode=True, _ansible_diff=True))
        assert checked["moved"] == [{"address": VIP, "port": ECHO_PORT, "protocol": "tcp",
                                     "moved": pytest.approx(share, abs=1e-6)}]
        assert checked["diff"]["after"]["moved"] == {"%s:%d/tcp" % (VIP, ECHO_PORT): checked["moved"][0]["moved"]}
        res = b.call("xvs_services", config)
        assert res["moved"] == checked["moved"] and 0 < share < 1
        with inside(b.ns), _dataplane.DataPlane(b.mods.root) as dp:
            assert dp.positions(dp.service(VIP, ECHO_PORT, "tcp")) == new
        current = want
    assert b.call("xvs_services", config)["moved"] == []        # nothing written, nothing moves


def test_balancers_with_the_same_destinations_show_the_same_digest(bpffs, tmp_path):
    """Two pin roots stand for two balancers: the same destinations given
    in different orders (so held in different slots) give one digest,
    other weights another."""
    from xvstest.packets import harness
    orders = [["192.0.2.21", "192.0.2.22", "192.0.2.23"], ["192.0.2.23", "192.0.2.21", "192.0.2.22"]]
    digests = []
    for n, (order, weight) in enumerate([(orders[0], 1), (orders[1], 1), (orders[1], 2)]):
        with harness(os.path.join(bpffs, "digest%d" % n), sizes={"maglev_table_size": 65537}) as h:
            for a in order:        # one at a time: each takes the next free slot
                current = [d["address"] for d in (h.dp.service(VIP, 80, "tcp") or {"destinations": []})["destinations"]]
                h.dp.set_service(VIP, 80, "tcp", False, [h.dest(x, weight if x == "192.0.2.21" else 1)
                                                         for x in current + [a]])
            svc = h.dp.service(VIP, 80, "tcp")
            digests.append((_maglev.digest(h.dp.positions(svc)), sorted(d["slot"] for d in svc["destinations"]),
                            dict((d["address"], d["slot"]) for d in svc["destinations"])))
        _loader.unpin_all(os.path.join(bpffs, "digest%d" % n))
    assert digests[0][2] != digests[1][2]            # the slots differ ...
    assert digests[0][0] == digests[1][0]            # ... the digests do not
    assert digests[2][0] != digests[0][0]
