"""The realserver's decapsulator (files/xdp_decap.c, docs/design.md §2.14),
frame by frame through BPF_PROG_TEST_RUN: what it decapsulates comes out
as the inner packet behind the same Ethernet header (and tag); everything
else passes byte for byte, and the refusals are counted."""
import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _decap, _loader
from xvstest.packets import VIP, XDP

VERDICT = {v: k for k, v in XDP.items()}
BAL, OTHER_BAL, RS, CLIENT = "192.0.2.2", "192.0.2.3", "198.51.100.21", "192.0.2.10"
BAL_MAC, RS_MAC = "02:00:00:00:00:fe", "02:00:00:00:00:15"


class Decap(object):
    def __init__(self, root, decap, sources=(), gue_port=6080, vips=(VIP,)):
        cfg = _decap.normalise({"interfaces": ["lo"], "decap": decap, "vips": list(vips),
                                "sources": list(sources), "gue_port": gue_port, "bpffs": root})
        self.root = root
        _decap.DecapPlan(cfg, _loader.read_source(_decap.default_source())).load_program()
        self.fd = _bpf.obj_get(os.path.join(root, _loader.PROG_PIN))

    def run(self, frame):
        ret, out = _bpf.prog_test_run(self.fd, bytes(frame))[:2]
        return VERDICT.get(ret, ret), out

    def close(self):
        os.close(self.fd)
        _decap.remove(self.root)


@pytest.fixture
def make(pin_root):
    made = []

    def factory(*a, **kw):
        made.append(Decap(pin_root, *a, **kw))
        return made[-1]
    yield factory
    for d in made:
        d.close()


def inner(dst=VIP, sport=40000):
    return bytes(IP(src=CLIENT, dst=dst) / TCP(sport=sport, dport=80, flags="S") / b"hello")


def l2(vlan=None):
    """The Ethernet header (and tag) of an IPv4 frame, from a balancer."""
    if vlan:
        return Ether(src=BAL_MAC, dst=RS_MAC, type=0x8100) / Dot1Q(vlan=vlan, prio=5, type=0x800)
    return Ether(src=BAL_MAC, dst=RS_MAC, type=0x800)


def ipip(payload, src=BAL, vlan=None, **kw):
    return bytes(l2(vlan) / IP(src=src, dst=RS, proto=4, flags="DF", **kw) / payload)


def gue(payload, port=6080, src=BAL):
    return bytes(l2() / IP(src=src, dst=RS, flags="DF") / UDP(sport=50000, dport=port, chksum=0) / payload)


@pytest.mark.parametrize("vlan", [None, 20])
def test_ipip_to_a_vip_comes_out_as_the_inner_packet(make, vlan):
    d = make("ipip")
    verdict, out = d.run(ipip(inner(), vlan=vlan))
    assert (verdict, out) == ("pass", bytes(l2(vlan)) + inner())
    assert _decap.counters(d.root)["decap_ipip"] == 1


def test_gue_to_a_vip_comes_out_as_the_inner_packet(make):
    d = make("gue", gue_port=7777)
    assert d.run(gue(inner(), port=7777)) == ("pass", bytes(l2()) + inner())
    assert _decap.counters(d.root)["decap_gue"] == 1


@pytest.mark.parametrize("given", [["ipip", "gue"], ["gue", "ipip", "gue"]])
def test_both_tunnel_types_at_once(make, given):
    """One backend of an ipip service and a gue service: each kind of
    frame comes out as its inner packet, IPv4 and IPv6, and is counted as
    what it was; the list is kept in one order whatever order it came in."""
    d = make(given, vips=(VIP, VIP6))
    assert d.run(ipip(inner())) == ("pass", bytes(l2()) + inner())
    assert d.run(gue(inner())) == ("pass", bytes(l2()) + inner())
    for frame in (ip6ip6(inner6()), gue6(inner6())):
        assert d.run(frame) == ("pass", frame[:14] + inner6())      # the Ethernet header kept
    assert _decap.counters(d.root) == {"decap_ipip": 2, "decap_gue": 2, "not_vip": 0, "not_source": 0}
    assert _decap.normalise({"interfaces": ["lo"], "decap": given, "vips": [VIP]})["decap"] == ["ipip", "gue"]


def test_listed_sources_only(make):
    d = make("ipip", sources=[BAL])
    assert d.run(ipip(inner()))[1] == bytes(l2()) + inner()
    frame = ipip(inner(), src=OTHER_BAL)
    assert d.run(frame) == ("pass", frame)
    assert _decap.counters(d.root) == {"decap_ipip": 1, "decap_gue": 0, "not_vip": 0, "not_source": 1}


def outer_fragment(n):
    frags = fragment(IP(src=BAL, dst=RS, proto=4) / (inner() + b"x" * 64), fragsize=48)
    return bytes(l2() / frags[n])


UNTOUCHED = {
    "inner_not_a_vip": lambda: ipip(inner(dst="203.0.113.99")),
    "outer_fragment": lambda: outer_fragment(0),
    "outer_later_fragment": lambda: outer_fragment(1),
    "gue_on_another_port": lambda: gue(inner(), port=6081),
    "ipip_when_gue_is_configured": lambda: ipip(inner()),
    "gue_variant_0_header": lambda: gue(b"\x00\x00\x00\x00" + inner()),
    "inner_ipv6": lambda: gue(bytes(IPv6(dst="2001:db8::1") / TCP())),
    "inner_truncated": lambda: gue(inner()[:12]),
    "plain_tcp_to_the_vip": lambda: bytes(l2() / IP(inner())),
    "icmp": lambda: bytes(l2() / IP(src=BAL, dst=RS) / ICMP()),
    "arp": lambda: bytes(Ether(src=BAL_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=RS)),
    "ipv6": lambda: bytes(Ether(src=BAL_MAC, dst=RS_MAC) / IPv6(dst="2001:db8::1") / TCP()),
    "qinq": lambda: bytes(Ether(src=BAL_MAC, dst=RS_MAC, type=0x88A8) / Dot1Q(vlan=1) / IP(src=BAL, dst=RS, proto=4) /
                          inner()),
    "truncated_outer": lambda: gue(inner())[:14 + 24],
}


@pytest.mark.parametrize("name", sorted(UNTOUCHED))
def test_everything_else_passes_byte_identical(make, name):
    d = make("gue")
    frame = UNTOUCHED[name]()
    assert d.run(frame) == ("pass", frame)
    c = _decap.counters(d.root)
    assert (c["decap_gue"], c["decap_ipip"]) == (0, 0)


def test_ipip_not_for_a_vip_is_counted(make):
    d = make("ipip")
    frame = ipip(inner(dst="203.0.113.99"))
    assert d.run(frame) == ("pass", frame)
    assert _decap.counters(d.root)["not_vip"] == 1


@pytest.mark.parametrize("params,msg", [
    ({"decap": "gre"}, "decap=gre: must be one of ipip, gue, or a list of them"),
    ({"decap": ["ipip", "gre"]}, r"decap=\['ipip', 'gre'\]: must be one of ipip, gue"),
    ({"decap": []}, r"decap=\[\]: must be one of ipip, gue"),
    ({"vips": []}, "vips: give the VIPs"),
    ({"vips": ["fe80::1"]}, r"vips\[0\]=fe80::1: not a unicast IPv6 address"),
    ({"sources": ["x"]}, r"sources\[0\]=x: not an IPv4 or IPv6 address"),
    ({"gue_port": 0}, "gue_port=0: must be a port number"),
    ({"interfaces": []}, "interfaces=\\[\\]: must be a list of interface names"),
])
def test_bad_options_are_one_line_errors(params, msg):
    good = {"interfaces": ["eth0"], "decap": "gue", "vips": [VIP]}
    with pytest.raises(_decap.XvsError, match=msg):
        _decap.normalise(dict(good, **params))


VIP6, RS6, BAL6, CLIENT6 = "2001:db8:100::10", "2001:db8:2::21", "2001:db8:1::2", "2001:db8:200::7"


def inner6(dst=VIP6):
    return bytes(IPv6(src=CLIENT6, dst=dst) / TCP(sport=40000, dport=80, flags="S") / b"hello")


def ip6ip6(payload, src=BAL6, vlan=None):
    e = Ether(src=BAL_MAC, dst=RS_MAC, type=0x86DD)
    if vlan:
        e = Ether(src=BAL_MAC, dst=RS_MAC, type=0x8100) / Dot1Q(vlan=vlan, prio=5, type=0x86DD)
    return bytes(e / IPv6(src=src, dst=RS6, nh=41) / payload)


@pytest.mark.parametrize("vlan", [None, 20])
def test_ip6ip6_to_an_ipv6_vip_comes_out_as_the_inner_packet(pin_root, vlan):
    d = Decap(pin_root, "ipip", sources=[BAL6], vips=[VIP, VIP6])
    try:
        frame = ip6ip6(inner6(), vlan=vlan)
        l2 = len(frame) - len(inner6()) - 40
        assert d.run(frame) == ("pass", frame[:l2] + inner6())
        for other in (ip6ip6(inner6(dst="2001:db8:100::99")), ip6ip6(inner6(), src="2001:db8:1::3")):
            assert d.run(other) == ("pass", other)
        assert _decap.counters(d.root) == {"decap_ipip": 1, "decap_gue": 0, "not_vip": 1, "not_source": 1}
    finally:
        d.close()


def gue6(payload, port=6080, src=BAL6, vlan=None):
    e = Ether(src=BAL_MAC, dst=RS_MAC, type=0x86DD)
    if vlan:
        e = Ether(src=BAL_MAC, dst=RS_MAC, type=0x8100) / Dot1Q(vlan=vlan, prio=5, type=0x86DD)
    return bytes(e / IPv6(src=src, dst=RS6) / UDP(sport=50000, dport=port) / payload)


@pytest.mark.parametrize("vlan", [None, 20])
def test_gue_over_ipv6_to_an_ipv6_vip_comes_out_as_the_inner_packet(make, vlan):
    d = make("gue", sources=[BAL6], gue_port=7777, vips=[VIP6])
    frame = gue6(inner6(), port=7777, vlan=vlan)
    l2 = len(frame) - len(inner6()) - 48
    assert d.run(frame) == ("pass", frame[:l2] + inner6())
    untouched = (gue6(inner6(), port=6080),                         # another port
                 gue6(inner(), port=7777),                          # IPv4 inside IPv6
                 ip6ip6(inner6()),                                  # IPv6-in-IPv6: ipip is off
                 gue6(inner6(dst="2001:db8:100::99"), port=7777),   # not a VIP
                 gue6(inner6(), port=7777, src="2001:db8:1::3"))    # not a source
    for other in untouched:
        assert d.run(other) == ("pass", other)
    assert _decap.counters(d.root) == {"decap_ipip": 0, "decap_gue": 1, "not_vip": 1, "not_source": 1}
