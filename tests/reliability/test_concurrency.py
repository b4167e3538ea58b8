"""Concurrency: many module runs at once against one host.

Parallel ansible-playbook runs and direct module invocations (the module
file run by Python with its arguments file, as Ansible itself does) all
change one balancer at the same time.  The end state must equal the
serial result, and every service's live Maglev table must be exactly
the one its destinations give: no map left half-written.
"""
import json
import os
import subprocess

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _layout as L, _loader, _maglev
from xvstest.lab import Lab
from xvstest.modules import BIN, Modules, balancer_ns
from xvstest.packets import live_table

VIP = "203.0.113.10"
SIZES = {"maglev_table_size": 251, "max_destinations": 32, "max_services": 16, "flow_table_size": 4096}
ADDED = ["192.0.2.%d" % (30 + i) for i in range(8)]      # one xvs_destination run each
PORTS = [81, 82, 83, 84]                                  # one playbook run each
BULK = [{"address": VIP, "port": 90 + i, "destinations": [{"address": "192.0.2.%d" % (21 + i)}]}
        for i in range(3)]                                # one xvs_services run


class Host(Modules):
    def playbook(self, port):
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": [{"xvs.lb.xvs_service": {
            "address": VIP, "port": port, "bpffs": self.root, "state_file": self.state_file,
            "destinations": [{"address": "192.0.2.%d" % (24 + port - 80)}, {"address": "192.0.2.21"}]}}]}]
        path = os.path.join(self.work, "play%d.json" % port)
        with open(path, "w") as f:
            json.dump(play, f)
        return subprocess.Popen(["ip", "netns", "exec", self.ns, os.path.join(BIN, "ansible-playbook"),
                                 "-i", "localhost,", "-c", "local", path],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs):
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def start(h):
    finish([h.start("xvs_attach", {"interfaces": ["eth0"], "sizes": SIZES})])
    finish([h.start("xvs_service", {"address": VIP, "port": 80, "destinations": [{"address": "192.0.2.20"}]})])


def runs(host):
    """Every change of the scenario, as processes not yet waited for."""
    dests = [host.start("xvs_destination", {"service_address": VIP, "service_port": 80, "address": a,
                                            "weight": 1 + i % 3}) for i, a in enumerate(ADDED)]
    bulk = host.start("xvs_services", {"config": BULK, "state": "merged"})
    return dests + [host.playbook(p) for p in PORTS] + [bulk]


def record(h):
    with open(h.state_file) as f:
        return json.load(f)["services"]


def assert_tables_whole(root):
    """Each service's live Maglev half is exactly the table its current
    destinations give, and points only at filled slots."""
    with _dataplane.DataPlane(root) as dp:
        for v in dp._services_raw().values():
            live = dp._dest_slots(v.index)
            plan = {L.ip_str(d.addr): slot for slot, d in live.items()}
            table = _maglev.build([(a, live[s].weight) for a, s in plan.items()], dp.maglev_table_size)
            want = [plan[a] for a in table] if table else [0] * dp.maglev_table_size
            assert live_table(dp, v.index, v.gen) == want, \
                "service %d half-written" % v.index


def state(root):
    with _dataplane.DataPlane(root) as dp:
        # slot numbers depend on arrival order; what is configured does not
        services = [dict(s, index=None, destinations=[{k: d[k] for k in ("address", "weight", "mac")}
                                                      for d in s["destinations"]]) for s in dp.services()]
    return sorted(services, key=lambda s: (s["address"], s["port"], s["protocol"]))


@pytest.fixture
def host(bpffs):
    with Lab("xk") as lab:
        ns = balancer_ns(lab)
        hosts = [Host(ns, os.path.join(bpffs, "concurrency_" + name)) for name in ("parallel", "serial")]
        try:
            yield hosts
        finally:
            for h in hosts:
                h.close()
                _loader.unpin_all(h.root)


def test_parallel_runs_end_where_serial_runs_end(host):
    parallel, serial = host
    # all at once against one host...
    start(parallel)
    outs = finish(runs(parallel))
    assert all('"changed": true' in o or "changed=1" in o for o in outs), outs
    assert_tables_whole(parallel.root)
    # ...and one after the other (under another root, attached in its turn)
    start(serial)
    for p in runs(serial):
        finish([p])
    assert state(parallel.root) == state(serial.root)
    got = {d["address"]: d["weight"] for s in state(parallel.root) if s["port"] == 80
           for d in s["destinations"]}
    assert got == dict({"192.0.2.20": 1}, **{a: 1 + i % 3 for i, a in enumerate(ADDED)})
    assert sorted(s["port"] for s in state(parallel.root)) == [80] + PORTS + [90, 91, 92]
    assert_tables_whole(parallel.root)
    # the state of record holds every change, as the serial runs left it
    assert record(parallel) == record(serial)
    assert [s["port"] for s in record(parallel)] == [80] + PORTS + [90, 91, 92]
