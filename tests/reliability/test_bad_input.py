"""Bad input: every module option given a wrong type, an
out-of-range value, an unknown interface, an address not on the link, a
duplicate, a value past a limit; a run with no attachment, no bpffs, and
maps pinned by an incompatible program version.  Each run must fail with
one line naming the option and the value, and leave every map of the
host and the state of record byte for byte as they were."""
import os

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _layout as L, _loader
from xvstest.lab import Lab, inside
from xvstest.modules import Modules, balancer_ns
from xvstest.packets import dump_maps

VIP = "203.0.113.10"
SIZES = {"max_services": 2, "max_destinations": 4, "maglev_table_size": 251, "flow_table_size": 4096}
ATTACH = {"interfaces": ["eth0"], "sizes": SIZES}
SVC = {"address": VIP, "port": 80, "destinations": [{"address": "192.0.2.21"}]}
DEST = {"service_address": VIP, "service_port": 80, "address": "192.0.2.22"}

CASES = [
    # xvs_attach
    ("xvs_attach", dict(ATTACH, interfaces=["eth0", "nosuch0"]), "nosuch0"),
    ("xvs_attach", dict(ATTACH, mode="turbo"), "turbo"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, max_services="many")), "many"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, maglev_table_size=250)), "maglev_table_size=250"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, max_destinations=70000)), "max_destinations=70000"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, flow_table_size=16)), "flow_table_size=16"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, tcp_timeout=-5)), "tcp_timeout=-5"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, flow_table_size=8192)), "flow_table_size=8192 (now 4096)"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, max_services=1)), "max_services=1 (now 2)"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, max_services=1), allow_flow_table_reset=True),
     "max_services=1: 2 services are configured"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, bogus=1)), "bogus"),
    ("xvs_attach", dict(ATTACH, vlans={"5000": "192.0.2.0/24"}), "5000"),
    ("xvs_attach", dict(ATTACH, vlans={"10": "not-a-network"}), "not-a-network"),
    ("xvs_attach", dict(ATTACH, source="/nonexistent/xdp.c"), "/nonexistent/xdp.c"),
    ("xvs_attach", dict(ATTACH, allow_flow_table_reset="perhaps"), "perhaps"),
    ("xvs_attach", dict(ATTACH, state="gone"), "gone"),
    # xvs_service
    ("xvs_service", dict(SVC, address="203.0.113.300"), "address=203.0.113.300"),
    ("xvs_service", dict(SVC, address="vip.example"), "address=vip.example"),
    ("xvs_service", dict(SVC, port=70000), "port=70000"),
    ("xvs_service", dict(SVC, port=0), "port=0"),
    ("xvs_service", dict(SVC, port="http"), "http"),
    ("xvs_service", dict(SVC, protocol="sctp"), "sctp"),
    ("xvs_service", dict(SVC, sticky="often"), "often"),
    ("xvs_service", dict(SVC, destinations=[{"address": "198.51.100.9"}]), "198.51.100.9"),
    ("xvs_service", dict(SVC, destinations=[{"address": "192.0.2.99"}]), "192.0.2.99"),
    ("xvs_service", dict(SVC, destinations=[{"address": "192.0.2.21"}, {"address": "192.0.2.21"}]),
     "192.0.2.21"),
    ("xvs_service", dict(SVC, destinations=[{"address": "192.0.2.21", "weight": -1}]), "weight=-1"),
    ("xvs_service", dict(SVC, destinations=[{"address": "192.0.2.21", "weight": "x"}]), "x"),
    ("xvs_service", dict(SVC, destinations=[{"address": "192.0.2.%d" % i} for i in range(21, 26)]),
     "max_destinations=4"),
    ("xvs_service", dict(SVC, port=82), "max_services=2"),
    ("xvs_service", dict(SVC, destinations=[{"address": "192.0.2.21", "colour": "red"}]), "colour"),
    # xvs_destination
    ("xvs_destination", dict(DEST, service_port=99), "service_port=99"),
    ("xvs_destination", dict(DEST, service_address="203.0.113.999"), "203.0.113.999"),
    ("xvs_destination", dict(DEST, address="192.0.2.256"), "192.0.2.256"),
    ("xvs_destination", dict(DEST, address="198.51.100.9"), "198.51.100.9"),
    ("xvs_destination", dict(DEST, mac="zz:zz"), "zz:zz"),
    ("xvs_destination", dict(DEST, weight=1 << 40), str(1 << 40)),
    ("xvs_destination", dict(DEST, address="192.0.2.25"), "max_destinations=4"),
    ("xvs_destination", dict(DEST, protocol="icmp"), "icmp"),
    # xvs_services: one bad entry anywhere refuses the whole config
    ("xvs_services", {"config": [SVC, dict(SVC, port=70000)]}, "config[1].port=70000"),
    ("xvs_services", {"config": [SVC, dict(SVC, port=81, destinations=[{"address": "198.51.100.9"}])]},
     "config[1].destinations[0].address=198.51.100.9"),
    ("xvs_services", {"config": [dict(SVC, destinations=[{"address": "192.0.2.21", "weight": -1}])]},
     "config[0].destinations[0].weight=-1"),
    ("xvs_services", {"config": [dict(SVC, destinations=[{"address": "192.0.2.21", "mac": "01:00:5e:00:00:01"}])]},
     "config[0].destinations[0].mac=01:00:5e:00:00:01"),
    ("xvs_services", {"config": [SVC, SVC]}, "config[1]: service 203.0.113.10:80/tcp listed more than once"),
    ("xvs_services", {"config": [SVC, dict(SVC, port=82)]}, "max_services=2"),
    ("xvs_services", {"config": [dict(SVC, destinations=[{"address": "192.0.2.%d" % i} for i in range(21, 26)])],
                      "state": "replaced"}, "max_destinations=4"),
    ("xvs_services", {"config": [SVC], "state": "sideways"}, "sideways"),
    ("xvs_services", {"state": "merged"}, "config"),
    ("xvs_services", {"config": [dict(SVC, colour="red")]}, "colour"),
    # health checks (xvs_services and xvs_service share them)
    ("xvs_services", {"config": [SVC, dict(SVC, port=81, check={"type": "ftp"})]}, "ftp"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "tcp", "interval": 0})]},
     "config[0].check.interval=0.0"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "tcp", "interval": 1, "timeout": 5})]},
     "config[0].check.timeout=5.0"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "tcp", "rise": 0})]}, "config[0].check.rise=0"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "tcp", "fall": 101})]}, "config[0].check.fall=101"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "tcp", "port": 70000})]},
     "config[0].check.port=70000"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "http", "path": "health"})]},
     "config[0].check.path=health"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "http", "expect_status": 99})]},
     "config[0].check.expect_status=99"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "exec"})]}, "config[0].check.command"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "tcp", "path": "/"})]}, "config[0].check.path"),
    ("xvs_services", {"config": [dict(SVC, check={"type": "tcp", "colour": "red"})]}, "colour"),
    ("xvs_services", {"config": [dict(SVC, min_healthy=-1)]}, "config[0].min_healthy=-1"),
    ("xvs_service", dict(SVC, check={"type": "https", "host": "a b"}), "check.host=a b"),
    # ansible-core's own float conversion names the option, not the value
    ("xvs_service", dict(SVC, check={"type": "tcp", "interval": "often"}), "'interval'"),
    ("xvs_service", dict(SVC, min_healthy=70000), "min_healthy=70000"),
    # tunnels: the method, its port, a destination the balancer has no route to
    ("xvs_service", dict(SVC, forwarding="gre"), "gre"),
    ("xvs_service", dict(SVC, forwarding="ipip", gue_port=6080), "gue_port: only for forwarding gue, not ipip"),
    ("xvs_service", dict(SVC, forwarding="gue", gue_port=70000), "gue_port=70000"),
    ("xvs_service", dict(SVC, forwarding="ipip", destinations=[{"address": "203.0.113.77"}]),
     "no route to 203.0.113.77"),
    ("xvs_services", {"config": [dict(SVC, port=81, gue_port=7000)]}, "gue_port: only for forwarding gue, not l2"),
    ("xvs_attach", dict(ATTACH, tunnel_source={"ipv4": "224.0.0.1"}), "ipv4=224.0.0.1"),
    ("xvs_attach", dict(ATTACH, tunnel_source={"ipv6": "fe80::1"}), "ipv6=fe80::1"),
    ("xvs_attach", dict(ATTACH, tunnel_source={"ipv6": "192.0.2.1"}), "ipv6=192.0.2.1"),
    # IPv6: one family per service, no link-local VIP, destinations on-link at layer 2
    ("xvs_service", dict(SVC, address="2001:db8::10"), "an IPv4 destination for the IPv6 VIP 2001:db8::10"),
    ("xvs_service", dict(SVC, address="fe80::10", destinations=[]), "address=fe80::10"),
    ("xvs_service", dict(SVC, address="2001:db8::10", destinations=[{"address": "2001:db8::21"}]),
     "2001:db8::21 is not on-link"),
    ("xvs_destination", dict(DEST, address="2001:db8::22"), "an IPv6 destination for the IPv4 VIP"),
    ("xvs_attach", dict(ATTACH, sizes=dict(SIZES, flow_table_size_v6=10)), "flow_table_size_v6=10"),
]


def one_line(result):
    msg = result.get("msg", "")
    assert result.get("failed") and msg and "\n" not in msg and "Traceback" not in msg, result
    return msg


@pytest.fixture(scope="module")
def host(bpffs):
    with Lab("xe") as lab:
        ns = balancer_ns(lab)
        root = os.path.join(bpffs, "bad_input")
        mods = Modules(ns, root)
        try:
            for name, args in [("xvs_attach", ATTACH), ("xvs_service", dict(SVC, destinations=[
                    {"address": "192.0.2.%d" % i} for i in (21, 22, 23, 24)])), ("xvs_service", dict(SVC, port=81))]:
                rc, res = mods.call(name, args)
                assert rc == 0, res
            yield lab, mods
        finally:
            mods.close()
            _loader.unpin_all(root)


@pytest.mark.parametrize("name,args,value", CASES, ids=["%s-%d" % (c[0], i) for i, c in enumerate(CASES)])
def test_refused_in_one_line_with_nothing_changed(host, name, args, value):
    lab, mods = host
    with inside(lab.name("bal")):
        before = dump_maps(mods.root)
        prog = _loader.status(mods.root)["program"]["id"]
    with open(mods.state_file, "rb") as f:
        record = f.read()
    rc, result = mods.call(name, args)
    assert rc != 0
    assert value in one_line(result)
    with inside(lab.name("bal")):
        assert dump_maps(mods.root) == before
        assert _loader.status(mods.root)["program"]["id"] == prog
    with open(mods.state_file, "rb") as f:
        assert f.read() == record


def test_no_attachment_and_no_bpffs(host, bpffs):
    lab, mods = host
    for root, value in [(os.path.join(bpffs, "never_attached"), "never_attached"),
                        ("/run/xvs-not-a-bpffs/lb", "/run/xvs-not-a-bpffs/lb")]:
        for name, args in [("xvs_service", SVC), ("xvs_destination", DEST), ("xvs_info", {})]:
            rc, result = mods.call(name, dict(args, bpffs=root))
            assert rc != 0 and value in one_line(result), (name, result)
        assert not os.path.exists(root)


def test_maps_of_an_incompatible_program_version(host, bpffs):
    """Maps whose meta says another data-plane ABI are refused by every
    module, and left alone."""
    lab, mods = host
    root = os.path.join(bpffs, "other_abi")
    try:
        with _loader.load(root, SIZES):
            pass
        with _bpf.Map(os.path.join(root, "meta")) as m:
            meta = L.Meta.from_buffer_copy(m.lookup(bytes(L.U32(0))))
            meta.abi_version = L.ABI_VERSION + 1
            m.update(bytes(L.U32(0)), bytes(meta))
        before = dump_maps(root)
        for name, args in [("xvs_attach", ATTACH), ("xvs_service", SVC), ("xvs_destination", DEST),
                           ("xvs_info", {})]:
            rc, result = mods.call(name, dict(args, bpffs=root))
            assert rc != 0 and "ABI %d" % (L.ABI_VERSION + 1) in one_line(result), (name, result)
        assert dump_maps(root) == before
    finally:
        _loader.unpin_all(root)
