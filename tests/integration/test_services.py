"""xvs_services end to end, and the state of record across a reboot.

The state matrix runs the modules as Ansible runs them and reads the maps
back; the reboot tests send real traffic through real XDP before and after
a simulated reboot (program detached, pins removed) that the restore
unit's own command recovers from the state of record.
"""
import json
import os
import re
import subprocess

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _balancer, _dataplane, _loader, _maglev, _planner
from xvstest.lab import ECHO_PORT, VIP, Lab, curl, dsr_lab, echo_connect, inside
from xvstest.modules import Modules, balancer_ns, restore_command
from xvstest.packets import dump_maps

SIZES = {"max_services": 8, "max_destinations": 8, "maglev_table_size": 251, "flow_table_size": 4096}
A, B, C, D = ("192.0.2.%d" % i for i in (21, 22, 23, 24))


def svc(port, *dests, **kw):
    return dict({"address": VIP, "port": port, "destinations": [
        d if isinstance(d, dict) else {"address": d} for d in dests]}, **kw)


def maps(mods):
    """{port: {destination: weight}} and sticky ports, read from the maps."""
    with inside(mods.ns), _dataplane.DataPlane(mods.root) as dp:
        services = dp.services()
    return ({s["port"]: {d["address"]: d["weight"] for d in s["destinations"]} for s in services},
            sorted(s["port"] for s in services if s["sticky"]))


@pytest.fixture
def mods(bpffs):
    with Lab("xs") as lab:
        m = Modules(balancer_ns(lab), os.path.join(bpffs, "services"))
        try:
            ok(m, "xvs_attach", {"interfaces": ["eth0"], "sizes": SIZES})
            yield m
        finally:
            m.close()
            with inside(m.ns):
                _loader.detach("eth0")
            _loader.unpin_all(m.root)


def ok(mods, name, args, changed=True):
    rc, res = mods.call(name, args)
    assert rc == 0, res
    assert res["changed"] == changed, res
    return res


START = [svc(80, A, {"address": B, "weight": 3}, sticky=True), svc(81, A, B)]


@pytest.mark.parametrize("state,config,want,sticky", [
    # listed services: destinations added, re-weighted, drained; unlisted one kept
    ("merged", [svc(80, {"address": B, "weight": 0}, C)], {80: {A: 1, B: 0, C: 1}, 81: {A: 1, B: 1}}, [80]),
    ("merged", [svc(82, D)], {80: {A: 1, B: 3}, 81: {A: 1, B: 1}, 82: {D: 1}}, [80]),
    # exactly as given: a destination removed, weights and sticky to defaults
    ("replaced", [svc(80, B, C)], {80: {B: 1, C: 1}, 81: {A: 1, B: 1}}, []),
    ("overridden", [svc(80, B, C), svc(82, {"address": D, "weight": 5})], {80: {B: 1, C: 1}, 82: {D: 5}}, []),
    ("deleted", [svc(80)], {81: {A: 1, B: 1}}, []),
    ("deleted", None, {}, []),
])
def test_state_matrix(mods, state, config, want, sticky):
    ok(mods, "xvs_services", {"config": START, "state": "overridden"})
    args = {"state": state}
    if config is not None:
        args["config"] = config
    # check mode plans the same change and writes nothing
    with inside(mods.ns):
        before = dump_maps(mods.root)
    res = ok(mods, "xvs_services", dict(args, _ansible_check_mode=True))
    with inside(mods.ns):
        assert dump_maps(mods.root) == before
    res = ok(mods, "xvs_services", args)
    assert maps(mods) == (want, sticky)
    # before and after in the config shape; the record holds after
    assert [s["port"] for s in res["before"]] == [80, 81]
    assert {s["port"]: {d["address"]: d["weight"] for d in s["destinations"]} for s in res["after"]} == want
    with open(mods.state_file) as f:
        assert json.load(f)["services"] == res["after"]
    # the same run again changes nothing; after comes only with a change
    again = ok(mods, "xvs_services", args, changed=False)
    assert again["before"] == res["after"] and "after" not in again


def test_tunnel_source_and_forwarding_in_the_view(mods):
    """A tunnel's outer source is the route's (the balancer's address)
    unless xvs_attach's tunnel_source says otherwise, and its MTU the
    route's or the link's; a run moves existing tunnels to what is in force."""
    res = ok(mods, "xvs_service", svc(80, A, forwarding="gue", gue_port=7000))
    assert (res["service"]["forwarding"], res["service"]["gue_port"]) == ("gue", 7000)
    dest = res["service"]["destinations"][0]
    assert (dest["tunnel_source"], dest["mtu"], dest["interface"]) == ("192.0.2.2", 1500, "eth0")
    res = ok(mods, "xvs_attach", {"interfaces": ["eth0"], "sizes": SIZES, "tunnel_source": {"ipv4": "192.0.2.9"}})
    assert res["tunnel_source"] == {"ipv4": "192.0.2.9"}
    ok(mods, "xvs_attach", {"interfaces": ["eth0"], "sizes": SIZES, "tunnel_source": {"ipv4": "192.0.2.9"}},
       changed=False)
    res = ok(mods, "xvs_service", svc(80, A, forwarding="ipip"))
    assert res["service"]["destinations"][0]["tunnel_source"] == "192.0.2.9"
    assert "gue_port" not in res["service"]
    info = ok(mods, "xvs_info", {}, changed=False)
    assert info["attachment"]["tunnel_source"] == {"ipv4": "192.0.2.9"}
    assert info["services"][0]["forwarding"] == "ipip"
    with open(mods.state_file) as f:
        record = json.load(f)
    assert record["attach"]["tunnel_source"] == {"ipv4": "192.0.2.9"}
    assert record["services"][0]["forwarding"] == "ipip"
    # the route's MTU changes: the next run takes it up, and then changes nothing
    subprocess.run(["ip", "netns", "exec", mods.ns, "ip", "route", "replace", "192.0.2.0/24", "dev", "eth0",
                    "src", "192.0.2.2", "mtu", "1400"], check=True)
    res = ok(mods, "xvs_service", svc(80, A, forwarding="ipip"))
    assert res["service"]["destinations"][0]["mtu"] == 1400
    ok(mods, "xvs_service", svc(80, A, forwarding="ipip"), changed=False)
    res = ok(mods, "xvs_service", svc(80, A, forwarding="l2"))
    assert "tunnel_source" not in res["service"]["destinations"][0]


def test_gathered_fed_back_as_overridden_changes_nothing(mods):
    ok(mods, "xvs_services", {"config": START + [svc(82, {"address": C, "mac": "02:00:00:00:00:99"}),
                                                 svc(83, D, forwarding="gue", gue_port=7000)],
                              "state": "merged"})
    gathered = ok(mods, "xvs_services", {"state": "gathered"}, changed=False)["gathered"]
    assert gathered[2]["destinations"] == [{"address": C, "weight": 1, "mac": "02:00:00:00:00:99"}]
    assert (gathered[3]["forwarding"], gathered[3]["gue_port"]) == ("gue", 7000)
    with inside(mods.ns):
        before = dump_maps(mods.root)
    mtime = os.stat(mods.state_file).st_mtime_ns
    ok(mods, "xvs_services", {"config": gathered, "state": "overridden"}, changed=False)
    with inside(mods.ns):
        assert dump_maps(mods.root) == before
    assert os.stat(mods.state_file).st_mtime_ns == mtime


def test_one_service_changed_one_table_built(mods, monkeypatch):
    """A Maglev table is built only for a service whose eligible
    destinations or weights change, and once for services that share them;
    a run that changes nothing builds none."""
    config = [svc(p, A, B) for p in range(80, 86)]
    built = []
    real = _maglev.build_indexes
    monkeypatch.setattr(_maglev, "build_indexes", lambda d, size: built.append(tuple(d)) or real(d, size))

    def run(config):
        with inside(mods.ns), _balancer.Balancer(mods.root) as bal:
            r = _planner.Run(bal, mods.state_file, _planner.transform(
                "overridden", _planner._spec.services(config)))
            r.apply()
            return r

    run(config)
    assert len(built) == 1                     # six new services, one distinct table
    del built[:]
    assert not run(config).changed and built == []
    config[2] = svc(82, A, {"address": B, "weight": 2})
    r = run(config)
    assert [sw.key for sw in r.plan.writes] == [_dataplane.svc_key(VIP, 82, "tcp")]
    assert built == [(("192.0.2.21", 1), ("192.0.2.22", 2))]


# ---- the state of record across a reboot ------------------------------------------
BACKENDS = {"b1": A, "b2": B, "b3": C}


def reboot(lab, root):
    """What a reboot loses: the XDP attachment, every pin and the
    neighbour table."""
    with inside(lab.name("bal")):
        _loader.detach("eth0")
    _loader.unpin_all(root)
    lab.sh(lab.name("bal"), "ip neigh flush all")
    assert curl(lab, "whoami", timeout=2).returncode != 0


@pytest.fixture
def lab(tmp_path):
    with dsr_lab("xr", tmp_path, BACKENDS) as lab:
        yield lab


def test_changes_by_any_module_survive_a_reboot(lab, bpffs, tmp_path):
    root = os.path.join(bpffs, "reboot")
    mods = Modules(lab.name("bal"), root)
    cmd = restore_command(tmp_path) + [mods.state_file]
    try:
        ok(mods, "xvs_attach", {"interfaces": ["eth0"], "mode": "generic", "sizes": SIZES})
        ok(mods, "xvs_services", {"config": [svc(ECHO_PORT, A, B, C)]})
        # drain b3 with xvs_destination, remove b2, add a service: none of it through the role
        ok(mods, "xvs_destination", {"service_address": VIP, "service_port": ECHO_PORT, "address": C,
                                     "weight": 0})
        ok(mods, "xvs_destination", {"service_address": VIP, "service_port": ECHO_PORT, "address": B,
                                     "state": "absent"})
        ok(mods, "xvs_service", {"address": VIP, "port": 80, "destinations": [{"address": B}]})
        # the drained b3 is powered off for maintenance, as it usually is next
        lab.sh(lab.name("b3"), "ip link set eth0 down")
        reboot(lab, root)
        r = subprocess.run(["ip", "netns", "exec", lab.name("bal")] + cmd, capture_output=True,
                           text=True, timeout=120, check=False)
        # every service up with the destinations that answer; b3 reported, no failure
        assert r.returncode == 0, r.stdout + r.stderr
        assert "2 service(s) in the record: 2 written" in r.stdout, r.stdout
        assert re.search(r" warning xvs: unresolved, left out of the maps until it answers: service "
                         r"203\.0\.113\.10:9000/tcp destination=192\.0\.2\.23: cannot resolve the MAC address",
                         r.stdout), r.stdout
        got = {echo_connect(lab.name("cli"))[2] for dummy in range(20)}
        assert got == {"b1"}                     # b3 drained (and off), b2 removed
        assert {curl(lab, "whoami", 22000 + i).stdout for i in range(6)} == {"b2"}   # the added service
        assert maps(mods)[0] == {ECHO_PORT: {A: 1}, 80: {B: 1}}
        rc, res = mods.call("xvs_info", {})
        assert rc == 0 and res["unresolved"] == [{"address": VIP, "port": ECHO_PORT, "protocol": "tcp",
                                                  "destination": C}], res
        # a run of the modules while b3 is off: it changes nothing and fails nothing, and says so
        rc, res = mods.call("xvs_services", {"config": [svc(80, B)], "state": "merged"})
        assert rc == 0 and not res["changed"] and [u["destination"] for u in res["unresolved"]] == [C], res
        assert "is not in the maps until it answers" in str(res["warnings"][0])
        # b3 back: the next run puts it in the maps (drained, as recorded), the record unchanged
        lab.sh(lab.name("b3"), "ip link set eth0 up")
        ok(mods, "xvs_services", {"config": [svc(ECHO_PORT, A, {"address": C, "weight": 0}), svc(80, B)],
                                  "state": "overridden"}, changed=True)
        assert maps(mods)[0] == {ECHO_PORT: {A: 1, C: 0}, 80: {B: 1}}
        ok(mods, "xvs_services", {"config": [svc(ECHO_PORT, A, {"address": C, "weight": 0}), svc(80, B)],
                                  "state": "overridden"}, changed=False)
    finally:
        mods.close()
        with inside(lab.name("bal")):
            _loader.detach("eth0")
        _loader.unpin_all(root)


@pytest.mark.parametrize("content", [None, "{truncated", json.dumps({"format": 9})])
def test_missing_or_corrupt_record_changes_no_map(mods, tmp_path, content):
    ok(mods, "xvs_services", {"config": START})
    bad = str(tmp_path / "state.json")
    if content is not None:
        with open(bad, "w") as f:
            f.write(content)
    with inside(mods.ns):
        before = dump_maps(mods.root)
    r = subprocess.run(["ip", "netns", "exec", mods.ns] + restore_command(tmp_path) + [bad],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and " error xvs-restore: state_file=%s: " % bad in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    rc, res = mods.call("xvs_services", {"config": START, "state_file": bad})
    if content is None:       # a module run with no record yet: the maps are the record
        assert rc == 0 and res["changed"], res    # the record is written, the maps already agree
    else:
        assert rc != 0 and "state_file=%s" % bad in res["msg"], res
    with inside(mods.ns):
        assert dump_maps(mods.root) == before
    if content is not None:
        with open(bad) as f:
            assert f.read() == content      # never overwritten


def test_restore_runs_on_the_system_python(tmp_path):
    """The restore imports nothing from Ansible: the target's system Python
    runs it with only bcc and pyroute2."""
    r = subprocess.run(restore_command(tmp_path) + [str(tmp_path / "none.json")],
                       capture_output=True, text=True, timeout=60, check=False, cwd="/",
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "cannot read the state of record" in r.stderr, r.stderr
