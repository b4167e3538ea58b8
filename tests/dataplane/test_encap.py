"""Layer-3 DSR (docs/design.md §2.13): IPIP, GUE and their IPv6 kinds,
and the ICMP too-big replies for frames that would not fit, frame by
frame through the real program (BPF_PROG_TEST_RUN), compared byte for byte
with what scapy builds and checked field by field."""
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.packet import NoPayload
from scapy.layers.l2 import Dot1Q, Ether

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L
from xvstest.packets import BALANCER_MAC, CLIENT, CLIENT_MAC, VIP, flow_hash, flow_hash6, harness, mac_for

ROUTED = ("198.51.100.21", "198.51.100.22", "198.51.100.23")
TUN_SRC = "192.0.2.2"
NEXT_HOP_MAC = "02:00:00:00:00:fe"
MTU = 1500


@pytest.fixture
def h(pin_root):
    with harness(pin_root) as hh:
        yield hh


# the control plane's overheads (_layout.METHODS), which the program's frames must bear out
TUNNELS4 = [(m.name, m.overhead[4]) for m in L.METHODS if m.tunnel]


def tunnel_dest(h, address, mtu=MTU, vlan=0):
    return dict(h.dest(address, vlan=vlan), mac=NEXT_HOP_MAC, tun_src=TUN_SRC, mtu=mtu)


def tunnel_service(h, forwarding, dests=ROUTED[:1], mtu=MTU, vlan=0, gue_port=6080, sticky=False):
    h.dp.set_service(VIP, 80, "tcp", sticky, [tunnel_dest(h, a, mtu, vlan) for a in dests],
                     {"method": forwarding, "gue_port": gue_port})


def client_ip(sport=40000, size=0, flags="S", tos=0x28):
    """The client's IPv4 packet to VIP:80, padded to size bytes."""
    pkt = IP(src=CLIENT, dst=VIP, tos=tos, id=321) / TCP(sport=sport, dport=80, flags=flags)
    pad = max(0, size - len(pkt))
    return bytes(pkt / (b"p" * pad))


def frame(inner, vlan=None):
    l2 = Ether(src=CLIENT_MAC, dst=BALANCER_MAC)
    return bytes((l2 / Dot1Q(vlan=vlan, prio=3) if vlan else l2) / IP(inner))


def outer(proto, dest, inner_len, tos=0x28):
    return IP(src=TUN_SRC, dst=dest, proto=proto, ttl=64, flags="DF", id=0, tos=tos,
              len=inner_len + (20 if proto == 4 else 28))


def gue_sport(sport, sticky=False):
    return 0xC000 | (flow_hash(CLIENT, VIP, 0 if sticky else sport, 80, 6) & 0x3FFF)


def assert_checksums(out, l2=14):
    """Every checksum of the output as a receiver checks it: with each one
    cleared, scapy recomputes the same bytes.  The quote inside an ICMP
    error (IPerror, TCPerror) is left alone: it is truncated, as sent."""
    pkt = IP(out[l2:])
    layer = pkt
    while not isinstance(layer, NoPayload):
        if layer.__class__ in (IP, TCP, ICMP, UDP) and (layer.__class__ is not UDP or layer.chksum):
            layer.chksum = None
        layer = layer.payload
    assert bytes(pkt) == out[l2:]


def test_ipip_puts_an_outer_header_in_front(h):
    tunnel_service(h, "ipip")
    inner = client_ip()
    verdict, out = h.run(frame(inner))
    want = bytes(Ether(src=BALANCER_MAC, dst=NEXT_HOP_MAC) / outer(4, ROUTED[0], len(inner))) + inner
    assert (verdict, out) == ("tx", want)
    assert IP(out[14:]).chksum == IP(bytes(outer(4, ROUTED[0], len(inner))))[IP].chksum
    assert_checksums(out)
    c = h.counters()
    assert (c["tx"], c["encap_ipip"], c["new_flows"]) == (1, 1, 1)


def test_gue_puts_outer_ip_and_udp_in_front_with_flow_entropy(h):
    tunnel_service(h, "gue", gue_port=7777)
    sports = set()
    for sport in range(40000, 40064):
        inner = client_ip(sport)
        verdict, out = h.run(frame(inner))
        udp = UDP(sport=gue_sport(sport), dport=7777, len=8 + len(inner), chksum=0)
        want = bytes(Ether(src=BALANCER_MAC, dst=NEXT_HOP_MAC) / outer(17, ROUTED[0], len(inner)) / udp) + inner
        assert (verdict, out) == ("tx", want)
        got = IP(out[14:])
        assert (got[UDP].chksum, got[UDP].len) == (0, 8 + len(inner))   # none, as IPv4 allows
        sports.add(got[UDP].sport)
        # the same flow's next packet takes the same outer port
        assert h.run(frame(client_ip(sport, flags="A")))[1][14 + 20:14 + 22] == out[14 + 20:14 + 22]
    assert len(sports) >= 60          # 64 flows spread over the 16,384 ports
    assert all(0xC000 <= p <= 0xFFFF for p in sports)
    assert h.counters()["encap_gue"] == 128


def test_sticky_gue_takes_its_port_from_the_addresses(h):
    tunnel_service(h, "gue", sticky=True)
    outs = {h.run(frame(client_ip(sport)))[1][34:36] for sport in (1000, 2000, 3000)}
    assert outs == {gue_sport(0, sticky=True).to_bytes(2, "big")}


def test_tunnel_on_a_vlan_keeps_priority_and_sets_the_id(h):
    tunnel_service(h, "ipip", vlan=20)
    inner = client_ip()
    verdict, out = h.run(frame(inner, vlan=10))
    want = bytes(Ether(src=BALANCER_MAC, dst=NEXT_HOP_MAC) / Dot1Q(vlan=20, prio=3) /
                 outer(4, ROUTED[0], len(inner))) + inner
    assert (verdict, out) == ("tx", want)
    assert_checksums(out, l2=18)


@pytest.mark.parametrize("forwarding,overhead", TUNNELS4)
def test_frame_that_fits_exactly_is_tunnelled(h, forwarding, overhead):
    tunnel_service(h, forwarding)
    inner = client_ip(size=MTU - overhead)
    verdict, out = h.run(frame(inner))
    assert verdict == "tx"
    assert len(out) == 14 + MTU and out[14 + overhead:] == inner


@pytest.mark.parametrize("forwarding,overhead", TUNNELS4)
@pytest.mark.parametrize("vlan", [None, 20])
def test_too_big_frame_is_answered_with_frag_needed(h, forwarding, overhead, vlan):
    tunnel_service(h, forwarding, vlan=vlan or 0)
    inner = client_ip(size=MTU - overhead + 1, flags="A")
    verdict, out = h.run(frame(inner, vlan=vlan))
    l2 = Ether(src=BALANCER_MAC, dst=CLIENT_MAC)
    l2 = l2 / Dot1Q(vlan=vlan, prio=3) if vlan else l2
    want = bytes(l2 / IP(src=VIP, dst=CLIENT, ttl=64, id=0) /
                 ICMP(type=3, code=4, nexthopmtu=MTU - overhead) / inner[:L.ICMP_QUOTE_LEN])
    assert (verdict, out) == ("tx", want)
    assert_checksums(out, l2=18 if vlan else 14)
    c = h.counters()
    assert (c["icmp_too_big"], c["tx"], c["encap_ipip"] + c["encap_gue"]) == (1, 0, 0)
    svc = h.dp.service(VIP, 80, "tcp")
    assert h.dp.service_stats(svc["index"])["packets"] == 0     # not counted as forwarded
    assert sum(c[k] for k in L.VERDICT_COUNTERS) == c["rx_packets"] == 1


def test_frag_needed_for_a_tunnelled_flow_goes_to_its_owner_encapsulated(h):
    tunnel_service(h, "ipip", dests=ROUTED)
    sport = 45678
    first = h.run(frame(client_ip(sport)))[1]
    owner = IP(first[14:]).dst
    quoted = IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=sport, flags="A")
    ptb = bytes(IP(src="192.0.2.254", dst=VIP) / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(quoted)[:28])
    verdict, out = h.run(frame(ptb))
    want = bytes(Ether(src=BALANCER_MAC, dst=NEXT_HOP_MAC) / outer(4, owner, len(ptb), tos=0)) + ptb
    assert (verdict, out) == ("tx", want)
    assert h.counters()["icmp_ptb_forwarded"] == 1


def test_changing_the_forwarding_method_moves_established_flows_with_it(h):
    h.dp.set_service(VIP, 80, "tcp", False, [h.dest(ROUTED[0])])
    inner = client_ip()
    assert h.run(frame(inner)) == ("tx", bytes(Ether(src=BALANCER_MAC, dst=mac_for(ROUTED[0]), type=0x800)) + inner)
    tunnel_service(h, "gue")
    svc = h.dp.service(VIP, 80, "tcp")
    assert svc["forwarding"] == {"method": "gue", "gue_port": 6080}
    assert svc["destinations"][0]["tun_src"] == TUN_SRC and svc["destinations"][0]["mtu"] == MTU
    verdict, out = h.run(frame(client_ip(flags="A")))
    assert verdict == "tx" and IP(out[14:]).proto == 17 and IP(out[14:])[UDP].dport == 6080
    tunnel_service(h, "ipip")
    assert IP(h.run(frame(client_ip(flags="A")))[1][14:]).proto == 4
    assert h.dp.set_service(VIP, 80, "tcp", False, [tunnel_dest(h, ROUTED[0])], {"method": "ipip"}) is False


# ---- IPv6-in-IPv6 (contract 13 for IPv6 services) ------------------------------
VIP6, CLIENT6 = "2001:db8:100::10", "2001:db8:200::7"
ROUTED6 = "2001:db8:2::21"
TUN_SRC6 = "2001:db8:1::2"


def tunnel_service6(h, mtu=MTU, vlan=0, forwarding="ipip", gue_port=6080):
    h.dp.set_service(VIP6, 80, "tcp", False, [dict(h.dest(ROUTED6, vlan=vlan), mac=NEXT_HOP_MAC,
                                                   tun_src=TUN_SRC6, mtu=mtu)],
                     {"method": forwarding, "gue_port": gue_port})


def client_ip6(sport=40000, size=0, flags="S", tc=0x28, payload=b""):
    """The client's IPv6 packet to VIP6:80, padded to size bytes; a given
    payload goes last (after the padding)."""
    pkt = IPv6(src=CLIENT6, dst=VIP6, tc=tc) / TCP(sport=sport, dport=80, flags=flags)
    return bytes(pkt / (b"p" * max(0, size - len(pkt) - len(payload)) + payload))


def frame6(inner, vlan=None):
    l2 = Ether(src=CLIENT_MAC, dst=BALANCER_MAC)
    return bytes((l2 / Dot1Q(vlan=vlan, prio=3) if vlan else l2) / IPv6(inner))


@pytest.mark.parametrize("vlan", [None, 20])
def test_ip6ip6_puts_an_outer_ipv6_header_in_front(h, vlan):
    tunnel_service6(h, vlan=vlan or 0)
    for sport in (40000, 40001):
        inner = client_ip6(sport)
        verdict, out = h.run(frame6(inner, vlan))
        l2 = Ether(src=BALANCER_MAC, dst=NEXT_HOP_MAC)
        l2 = l2 / Dot1Q(vlan=vlan, prio=3) if vlan else l2
        label = flow_hash6(CLIENT6, VIP6, sport, 80, 6) & 0xFFFFF
        outer = IPv6(src=TUN_SRC6, dst=ROUTED6, nh=41, hlim=64, tc=0x28, fl=label, plen=len(inner))
        assert (verdict, out) == ("tx", bytes(l2 / outer) + inner)
    assert h.counters()["encap_ipip"] == 2
    svc = h.dp.service(VIP6, 80, "tcp")
    assert svc["destinations"][0]["tun_src"] == TUN_SRC6 and svc["forwarding"] == {"method": "ipip"}


def test_ipv6_frame_too_big_for_the_tunnel_gets_packet_too_big(h):
    tunnel_service6(h)
    fits = client_ip6(size=MTU - 40)
    assert h.run(frame6(fits))[0] == "tx"
    inner = client_ip6(size=MTU - 39, flags="A")
    verdict, out = h.run(frame6(inner))
    want = bytes(Ether(src=BALANCER_MAC, dst=CLIENT_MAC) / IPv6(src=VIP6, dst=CLIENT6, hlim=64) /
                 ICMPv6PacketTooBig(mtu=MTU - 40) / inner[:L.ICMP_QUOTE_LEN])
    assert (verdict, out) == ("tx", want)                 # scapy computed the checksum
    c = h.counters()
    assert (c["icmp_too_big"], c["encap_ipip"]) == (1, 1)


# ---- GUE over IPv6: a UDP checksum over the whole datagram -------------------
def gue6(inner, sport, port=6080):
    """The outer headers GUE over IPv6 puts in front of inner, with the
    UDP checksum scapy computes (over the pseudo-header and datagram)."""
    label = flow_hash6(CLIENT6, VIP6, sport, 80, 6)
    return (IPv6(src=TUN_SRC6, dst=ROUTED6, nh=17, hlim=64, tc=0x28, fl=label & 0xFFFFF) /
            UDP(sport=0xC000 | (label & 0x3FFF), dport=port) / inner)


@pytest.mark.parametrize("vlan", [None, 20])
def test_gue6_carries_a_udp_checksum_over_the_whole_datagram(h, vlan):
    """Every length from a bare SYN to 3,000 bytes (a 9,000-byte MTU), in
    steps that cross the summing's 512-byte chunks and end in zero to three
    bytes past a word, comes out byte for byte as scapy builds it."""
    tunnel_service6(h, mtu=9000, forwarding="gue", gue_port=7777, vlan=vlan or 0)
    l2 = Ether(src=BALANCER_MAC, dst=NEXT_HOP_MAC)
    l2 = l2 / Dot1Q(vlan=vlan, prio=3) if vlan else l2
    sizes = list(range(60, 140)) + list(range(505, 1040, 13)) + [1023, 1024, 1025, 1026, 2047, 3000]
    for n, size in enumerate(sizes):
        inner = client_ip6(40000 + n, size=size)
        verdict, out = h.run(frame6(inner, vlan))
        want = bytes(l2 / gue6(inner, 40000 + n, port=7777))
        assert (verdict, out) == ("tx", want), size
        got = IPv6(out[18 if vlan else 14:])
        assert got[UDP].chksum != 0 and got[UDP].len == 8 + len(inner) and got.plen == 8 + len(inner)
    assert h.counters()["encap_gue"] == len(sizes)


def test_gue6_sends_a_zero_sum_as_all_ones(h):
    """A datagram whose checksum works out to 0 carries 0xffff (0 would
    mean no checksum): the inner packet's last two bytes are chosen so."""
    tunnel_service6(h, forwarding="gue")
    inner = client_ip6(size=100, payload=b"\0\0")
    fill = bytes(IPv6(bytes(gue6(inner, 40000))))
    want_sum = IPv6(fill)[UDP].chksum             # the sum with the two bytes at 0 ...
    inner = inner[:-2] + want_sum.to_bytes(2, "big")  # ... added in makes it 0xffff: checksum 0
    verdict, out = h.run(frame6(inner))
    assert verdict == "tx" and out[14 + 40 + 6:14 + 40 + 8] == b"\xff\xff"
    assert out[14 + 48:] == inner


def test_gue6_frame_too_big_gets_packet_too_big_for_48_bytes_of_overhead(h):
    tunnel_service6(h, forwarding="gue")
    assert h.run(frame6(client_ip6(size=MTU - 48)))[0] == "tx"
    inner = client_ip6(size=MTU - 47, flags="A")
    verdict, out = h.run(frame6(inner))
    want = bytes(Ether(src=BALANCER_MAC, dst=CLIENT_MAC) / IPv6(src=VIP6, dst=CLIENT6, hlim=64) /
                 ICMPv6PacketTooBig(mtu=MTU - 48) / inner[:L.ICMP_QUOTE_LEN])
    assert (verdict, out) == ("tx", want)
    c = h.counters()
    assert (c["icmp_too_big"], c["encap_gue"]) == (1, 1)
