"""The data-plane contract for IPv6 services (docs/design.md §2.15), frame
by frame through BPF_PROG_TEST_RUN: verdicts, exact output bytes and the
counters each frame moves, as test_contract.py does for IPv4."""
import ipaddress
import os
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6EchoReply, ICMPv6ND_NA,
                                ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment6)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import Dot1Q, Ether

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L
from xvstest.packets import (BALANCER_MAC, CLIENT_MAC, VIP as VIP4, dest_of, expected_dest, flows, harness,
                             mac_for, rewrite_macs)

VIP = "2001:db8:100::10"
CLIENT = "2001:db8:200::7"
B1, B2, B3 = "2001:db8::21", "2001:db8::22", "2001:db8::23"
SIZE = 251


@pytest.fixture
def h(pin_root):
    with harness(pin_root) as hh:
        yield hh


def service(h, dests, port=80, proto="tcp", sticky=False):
    h.dp.set_service(VIP, port, proto, sticky, [h.dest(a, w) for a, w in dests])


def eth(vlan=None):
    e = Ether(src=CLIENT_MAC, dst=BALANCER_MAC)
    return e / Dot1Q(vlan=vlan, prio=5) if vlan else e


def tcp(sport=40000, dport=80, dst=VIP, src=CLIENT, flags="S", payload=b"", ext=None, vlan=None):
    ip = IPv6(src=src, dst=dst)
    for header in ext or []:
        ip = ip / header
    return bytes(eth(vlan) / ip / TCP(sport=sport, dport=dport, flags=flags) / payload)


def udp(sport=40000, dport=53):
    return bytes(eth() / IPv6(src=CLIENT, dst=VIP) / UDP(sport=sport, dport=dport) / b"q")


def owner(out):
    return dest_of(out, B1)


# ---- 2. forward, 3. selection --------------------------------------------------
def test_forward_tcp_and_udp_rewrite_only_macs(h):
    service(h, [(B1, 1)])
    service(h, [(B2, 1)], port=53, proto="udp")
    frame = tcp(payload=b"hello")
    assert h.run(frame) == ("tx", rewrite_macs(frame, mac_for(B1)))
    assert h.run(udp()) == ("tx", rewrite_macs(udp(), mac_for(B2)))
    c = h.counters()
    assert (c["tx"], c["new_flows"], c["pass"]) == (2, 2, 0)


def test_vlan_id_rewritten_on_trunk(h):
    h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1, vlan=20)])
    verdict, out = h.run(tcp(vlan=10))
    want = bytes(Ether(src=BALANCER_MAC, dst=mac_for(B1)) / Dot1Q(vlan=20, prio=5) / IPv6(src=CLIENT, dst=VIP) /
                 TCP(sport=40000, dport=80, flags="S"))
    assert (verdict, out) == ("tx", want)


def test_new_flows_follow_weighted_maglev(h):
    dests = [(B1, 1), (B2, 2), (B3, 3)]
    service(h, dests)
    seen = {}
    for sport in range(20000, 20300):
        verdict, out = h.run(tcp(sport=sport))
        assert verdict == "tx"
        assert owner(out) == expected_dest(dests, SIZE, CLIENT, VIP, sport, 80)
        seen[owner(out)] = seen.get(owner(out), 0) + 1
    assert set(seen) == {B1, B2, B3} and seen[B3] > seen[B1]


def test_sticky_service_hashes_addresses_only(h):
    dests = [(B1, 1), (B2, 1), (B3, 1)]
    service(h, dests, sticky=True)
    for i in range(1, 30):
        client = "2001:db8:200::%x" % i
        outs = {owner(h.run(tcp(src=client, sport=p))[1]) for p in (1000, 2000, 3000)}
        assert outs == {expected_dest(dests, SIZE, client, VIP, 0, 80)}


# ---- 4. affinity, 5. drain ------------------------------------------------------
def test_flows_keep_their_destination_drain_and_removal(h):
    service(h, [(B1, 1), (B2, 1)])
    ports = range(30000, 30100)
    first = {p: owner(h.run(tcp(sport=p))[1]) for p in ports}
    service(h, [(B1, 0), (B2, 1), (B3, 1)])             # B1 drained, B3 added
    assert {p: owner(h.run(tcp(sport=p, flags="A"))[1]) for p in ports} == first
    assert B1 not in {owner(h.run(tcp(sport=p))[1]) for p in range(50000, 50200)}
    service(h, [(B2, 1), (B3, 1)])                      # B1 removed: its flows select again
    for p in ports:
        got = owner(h.run(tcp(sport=p, flags="A"))[1])
        assert got == (first[p] if first[p] != B1 else expected_dest([(B2, 1), (B3, 1)], SIZE, CLIENT, VIP, p, 80))


def test_ipv4_and_ipv6_services_side_by_side(h):
    service(h, [(B1, 1)])
    assert L.prefix6_slot("2001:db8:200::") != L.prefix6_slot("2001:db8:201::")
    h.dp.set_service(VIP4, 80, "tcp", False, [h.dest("192.0.2.21")])
    assert owner(h.run(tcp())[1]) == B1
    v4 = bytes(eth() / IP(src="198.51.100.7", dst=VIP4) / TCP(dport=80))
    assert h.run(v4) == ("tx", rewrite_macs(v4, mac_for("192.0.2.21")))
    assert {s["address"] for s in h.dp.services()} == {VIP4, VIP}
    assert {s["index"] for s in h.dp.services()} == {0, 1}     # one index space


# ---- 6. unroutable VIP traffic ------------------------------------------------
def test_unconfigured_port_and_no_destination_dropped(h):
    service(h, [(B1, 0)])
    assert h.run(tcp(dport=81))[0] == "drop"
    assert h.run(tcp())[0] == "drop"
    c = h.counters()
    assert (c["drop_no_service"], c["drop_no_dest"]) == (1, 1)


# ---- 7. ICMPv6 ------------------------------------------------------------------
def test_echo_request_answered(h):
    service(h, [(B1, 1)])
    req = eth() / IPv6(src=CLIENT, dst=VIP, hlim=17) / ICMPv6EchoRequest(id=0x1234, seq=3, data=b"ping")
    verdict, out = h.run(bytes(req))
    want = Ether(src=BALANCER_MAC, dst=CLIENT_MAC) / IPv6(src=VIP, dst=CLIENT, hlim=64) / \
        ICMPv6EchoReply(id=0x1234, seq=3, data=b"ping")
    assert (verdict, out) == ("tx", bytes(want))            # scapy computed the checksum
    assert h.counters()["icmp_echo_reply"] == 1


def test_packet_too_big_goes_to_the_flow_owner(h):
    service(h, [(B1, 1), (B2, 1), (B3, 1)])
    sport = 45678
    flow_owner = owner(h.run(tcp(sport=sport))[1])
    quoted = bytes(IPv6(src=VIP, dst=CLIENT) / TCP(sport=80, dport=sport, flags="A"))
    ptb = bytes(eth() / IPv6(src="2001:db8:300::1", dst=VIP) / ICMPv6PacketTooBig(mtu=1400) / quoted)
    assert h.run(ptb) == ("tx", rewrite_macs(ptb, mac_for(flow_owner)))
    # quoting a packet that was not from this VIP: dropped
    other = bytes(IPv6(src="2001:db8:100::99", dst=CLIENT) / TCP(sport=80, dport=sport))
    assert h.run(bytes(eth() / IPv6(src="2001:db8:300::1", dst=VIP) / ICMPv6PacketTooBig() / other))[0] == "drop"
    c = h.counters()
    assert (c["icmp_ptb_forwarded"], c["drop_icmp"]) == (1, 1)


def test_neighbour_discovery_passes_and_other_icmpv6_is_dropped(h):
    service(h, [(B1, 1)])
    for frame in (eth() / IPv6(src=CLIENT, dst=VIP) / ICMPv6ND_NS(tgt=VIP),
                  eth() / IPv6(src=CLIENT, dst=VIP) / ICMPv6ND_NA(tgt=CLIENT),
                  eth() / IPv6(src=CLIENT, dst="ff02::1:ff00:10") / ICMPv6ND_NS(tgt=VIP)):
        assert h.run(bytes(frame)) == ("pass", bytes(frame))
    assert h.run(bytes(eth() / IPv6(src=CLIENT, dst=VIP) / ICMPv6DestUnreach() / (b"\0" * 48)))[0] == "drop"
    c = h.counters()
    assert (c["pass"], c["drop_icmp"]) == (3, 1)


# ---- 1 and 8: extension headers, fragments, pass-through --------------------------
@pytest.mark.parametrize("ext", [
    [IPv6ExtHdrHopByHop()],
    [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrRouting(addresses=[]), IPv6ExtHdrDestOpt(), IPv6ExtHdrDestOpt(), IPv6ExtHdrDestOpt()],
], ids=["hop-by-hop", "hop-by-hop+destination", "four"])
def test_extension_headers_are_walked(h, ext):
    service(h, [(B1, 1)])
    frame = tcp(ext=ext, payload=b"x")
    assert h.run(frame) == ("tx", rewrite_macs(frame, mac_for(B1)))


FIVE = [IPv6ExtHdrDestOpt() for dummy in range(5)]


@pytest.mark.parametrize("ext", [FIVE, [AH()]], ids=["five", "ah"])
def test_chains_not_followed_drop_for_a_vip_and_pass_otherwise(h, ext):
    service(h, [(B1, 1)])
    assert h.run(tcp(ext=ext))[0] == "drop"
    other = tcp(ext=ext, dst="2001:db8:100::99")
    assert h.run(other) == ("pass", other)
    c = h.counters()
    assert (c["drop_ipv6_ext"], c["pass"]) == (1, 1)


def _fragments(src, sport, dport=80):
    pkt = IPv6(src=src, dst=VIP) / IPv6ExtHdrFragment(id=99) / UDP(sport=sport, dport=dport) / (b"z" * 200)
    return [bytes(eth() / f) for f in fragment6(pkt, 120)]


def test_fragments_of_a_sticky_service_follow_the_first(h):
    dests = [(B1, 1), (B2, 1), (B3, 1)]
    service(h, dests, proto="udp", sticky=True)
    for i in range(1, 12):
        client = "2001:db8:200::%x" % i
        frags = _fragments(client, 5000 + i)
        assert len(frags) >= 2
        want = expected_dest(dests, SIZE, client, VIP, 0, 80, 17)
        assert [h.run(f) for f in frags] == [("tx", rewrite_macs(f, mac_for(want))) for f in frags]


def test_later_fragments_of_another_service_dropped(h):
    service(h, [(B1, 1)], proto="udp")
    frags = _fragments(CLIENT, 5000)
    assert h.run(frags[0])[0] == "tx"
    assert [h.run(f)[0] for f in frags[1:]] == ["drop"] * (len(frags) - 1)
    assert h.counters()["drop_fragment"] == len(frags) - 1


def _payload_beyond_frame():
    raw = bytearray(tcp())
    struct.pack_into("!H", raw, 14 + 4, 1400)
    return bytes(raw)


PASS = {
    "non_vip": lambda: tcp(dst="2001:db8:100::99"),
    "hop_limit_0": lambda: bytes(eth() / IPv6(src=CLIENT, dst=VIP, hlim=0) / TCP(dport=80)),
    "payload_beyond_frame": _payload_beyond_frame,
    "truncated_header": lambda: tcp()[:14 + 30],
    "truncated_extension": lambda: tcp(ext=[IPv6ExtHdrDestOpt()])[:14 + 40 + 1],
    "vip_other_protocol": lambda: bytes(eth() / IPv6(src=CLIENT, dst=VIP, nh=132) / (b"\0" * 12)),
    "version_4_in_ipv6_ethertype": lambda: bytes(Ether(src=CLIENT_MAC, dst=BALANCER_MAC, type=0x86DD)) + tcp()[54:],
}


@pytest.mark.parametrize("name", sorted(PASS))
def test_pass_through_is_byte_identical(h, name):
    service(h, [(B1, 1)])
    frame = PASS[name]()
    assert h.run(frame) == ("pass", frame)
    c = h.counters()
    assert (c["pass"], c["rx_packets"]) == (1, 1)


def test_filter_collision_passes(h):
    service(h, [(B1, 1)])
    other = "2001:db8:100::99"
    bit = L.vip_filter_bit(L.fold6(other))
    key = struct.pack("=I", bit // 64)
    word = int.from_bytes(h.dp.maps["vip_filter"].lookup(key), "little")
    h.dp.maps["vip_filter"].update(key, (word | 1 << (bit % 64)).to_bytes(8, "little"))
    frame = tcp(dst=other)
    assert h.run(frame) == ("pass", frame)


# ---- 9. counters --------------------------------------------------------------------
def test_service_and_destination_counters_and_verdicts_add_up(h):
    service(h, [(B1, 1)])
    frames = [tcp(sport=p) for p in range(100, 110)]
    for f in frames:
        h.run(f)
    h.run(tcp(sport=100, flags="A"))
    svc = h.dp.service(VIP, 80, "tcp")
    want = {"packets": 11, "bytes": 11 * len(frames[0]), "new_flows": 10}
    assert h.dp.service_stats(svc["index"]) == want
    assert h.dp.dest_stats(svc["index"], svc["destinations"][0]["slot"]) == want
    assert h.dp.busiest_prefixes(5) == [{"prefix": "2001:db8:200::/48", "packets": 11}]
    assert {f["vip"] for f in flows(h.dp)} == {VIP} and len(flows(h.dp)) == 10
    c = h.counters()
    assert sum(c[k] for k in L.VERDICT_COUNTERS) == c["rx_packets"] == 11


def test_prefix_counters_count_clients_per_48_beside_ipv4(h):
    """Contract 9 for IPv6: per source /48, whatever the rest of the
    address; listed with the IPv4 /20s, busiest first (these /48s have
    slots of their own)."""
    service(h, [(B1, 1)])
    h.dp.set_service(VIP4, 80, "tcp", False, [h.dest("192.0.2.21")])
    for i in range(3):                              # three /64s of one /48
        h.run(tcp(sport=100 + i, src="2001:db8:200:%x::%x" % (i, i + 1)))
    h.run(tcp(sport=200, src="2001:db8:201::1"))    # the next /48
    h.run(tcp(sport=300, dst="2001:db8:100::99"))   # not a VIP: passed, not counted
    for sport in (400, 401):                        # and an IPv4 client twice
        h.run(bytes(eth() / IP(src="198.51.100.1", dst=VIP4) / TCP(sport=sport, dport=80, flags="S")))
    assert h.dp.busiest_prefixes(5) == [{"prefix": "2001:db8:200::/48", "packets": 3},
                                        {"prefix": "198.51.96.0/20", "packets": 2},
                                        {"prefix": "2001:db8:201::/48", "packets": 1}]
    assert h.dp.busiest_prefixes(2) == h.dp.busiest_prefixes(5)[:2]


def test_a_busy_48_keeps_its_slot_against_a_quiet_one_sharing_it(h):
    """Two /48s that hash to one slot: the quiet one's packets are taken
    from the busy one's count, never credited to the wrong /48, and the
    slot passes to the other once the count is spent."""
    service(h, [(B1, 1)])
    busy = "2001:db8:200::1"
    quiet = next(a for a in ("2001:db8:%x::1" % i for i in range(0x300, 0x30000))
                 if L.prefix6_slot(a) == L.prefix6_slot(busy))
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})           # each CPU has its slots: keep to one
    try:
        for i in range(5):
            h.run(tcp(sport=100 + i, src=busy))
        h.run(tcp(sport=200, src=quiet))
        assert h.dp.busiest_prefixes(5) == [{"prefix": "2001:db8:200::/48", "packets": 4}]
        for i in range(5):
            h.run(tcp(sport=201 + i, src=quiet))   # 4 to spend the count, then the slot is quiet's
        assert h.dp.busiest_prefixes(5) == [{"prefix": str(ipaddress.IPv6Network(quiet + "/48", strict=False)),
                                             "packets": 1}]
    finally:
        os.sched_setaffinity(0, cpus)
