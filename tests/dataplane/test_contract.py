"""The data-plane contract (docs/design.md section 2), frame by frame.

Every test sends frames through the real program with BPF_PROG_TEST_RUN
(repeat=1, a fresh buffer each run) and compares the verdict, the exact
output bytes and the counters the frame must move.
"""
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _layout as L
from xvstest.packets import (BALANCER_MAC, CLIENT, CLIENT_MAC, VIP, dest_of, dump_maps,
                             expected_dest, harness, mac_for, rewrite_macs)

B1, B2, B3 = "192.0.2.21", "192.0.2.22", "192.0.2.23"
SIZE = 251  # the test build's maglev_table_size


@pytest.fixture
def h(pin_root):
    with harness(pin_root) as hh:
        yield hh


def tcp(sport=40000, dport=80, dst=VIP, src=CLIENT, flags="S", payload=b"", **ip):
    return Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src=src, dst=dst, **ip) / \
        TCP(sport=sport, dport=dport, flags=flags) / payload


def udp(sport=40000, dport=53, dst=VIP, src=CLIENT):
    return Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src=src, dst=dst) / \
        UDP(sport=sport, dport=dport) / b"q"


def service(h, dests, port=80, proto="tcp", sticky=False):
    h.dp.set_service(VIP, port, proto, sticky, [h.dest(a, w) for a, w in dests])


# ---- 1. pass-through ------------------------------------------------------
def _ip_truncated():
    raw = bytes(tcp(dst="192.0.2.99"))
    return raw[:14 + 10]


def _tot_len_beyond_frame():
    raw = bytearray(bytes(tcp()))
    struct.pack_into("!H", raw, 14 + 2, 1400)
    return bytes(raw)


def _bad_ihl():
    raw = bytearray(bytes(tcp()))
    raw[14] = 0x44  # version 4, IHL 4 words: less than a header
    return bytes(raw)


PASS_FRAMES = {
    "arp": lambda: Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=VIP, psrc=CLIENT),
    "ipv6": lambda: Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IPv6(dst="2001:db8::1") / TCP(dport=80),
    "non_vip_tcp": lambda: tcp(dst="192.0.2.99"),
    "non_vip_fragment": lambda: fragment(IP(src=CLIENT, dst="192.0.2.99") / UDP() / (b"x" * 64),
                                         fragsize=32)[1],
    "non_vip_options": lambda: tcp(dst="192.0.2.99", options=[IPOption_RR()]),
    "non_vip_tagged": lambda: Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / Dot1Q(vlan=10) /
    IP(src=CLIENT, dst="192.0.2.99") / TCP(),
    "vip_ttl0": lambda: tcp(ttl=0),
    "vip_gre": lambda: Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src=CLIENT, dst=VIP, proto=47) / (b"\0" * 8),
    "vip_qinq": lambda: Ether(src=CLIENT_MAC, dst=BALANCER_MAC, type=0x88A8) / Dot1Q(vlan=10) /
    IP(src=CLIENT, dst=VIP) / TCP(dport=80),
    "truncated_ip": _ip_truncated,
    "tot_len_beyond_frame": _tot_len_beyond_frame,
    "bad_ihl": _bad_ihl,
    "vip_truncated_l4": lambda: bytes(tcp())[:14 + 20 + 2],
    # the kernel hands XDP nothing shorter than an Ethernet header
    "ethernet_header_only": lambda: bytes(tcp())[:14],
}


@pytest.mark.parametrize("name", sorted(PASS_FRAMES))
def test_pass_through_is_byte_identical(h, name):
    service(h, [(B1, 1)])
    frame = bytes(PASS_FRAMES[name]())
    verdict, out = h.run(frame)
    assert verdict == "pass"
    assert out == frame
    c = h.counters()
    assert (c["rx_packets"], c["pass"], c["rx_bytes"]) == (1, 1, len(frame))
    assert c["tx"] == c["new_flows"] == 0


def _filter_word(h, address):
    """(key, bit within the word, word) of address's VIP filter bit."""
    bit = L.vip_filter_bit(L.be32(address))
    key = struct.pack("=I", bit // 64)
    return key, bit % 64, int.from_bytes(h.dp.maps["vip_filter"].lookup(key), "little")


def filter_bit(h, address):
    dummy, bit, word = _filter_word(h, address)
    return (word >> bit) & 1


def mark_in_filter(h, address):
    """Set address's VIP filter bit, as a collision with a VIP would."""
    key, bit, word = _filter_word(h, address)
    h.dp.maps["vip_filter"].update(key, (word | 1 << bit).to_bytes(8, "little"))


@pytest.mark.parametrize("frame", ["tcp", "icmp_echo", "later_fragment"])
def test_filter_collision_with_a_vip_still_passes(h, frame):
    """Contract 1 through the VIP filter: an address whose bit a VIP set
    is settled by the lookups behind the filter, and passes untouched."""
    vip, other = VIP, "192.0.2.99"
    h.dp.set_service(vip, 80, "tcp", True, [h.dest(B1, 1)])   # sticky: fragments have a port
    mark_in_filter(h, other)
    frames = {"tcp": lambda: tcp(dst=other),
              "icmp_echo": lambda: Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src=CLIENT, dst=other) / ICMP(),
              "later_fragment": lambda: fragment(IP(src=CLIENT, dst=other) / TCP(dport=80) / (b"x" * 64),
                                                 fragsize=32)[1]}
    raw = bytes(Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / frames[frame]()) if frame == "later_fragment" \
        else bytes(frames[frame]())
    assert h.run(raw) == ("pass", raw)
    assert h.run(bytes(tcp(dst=vip)))[0] == "tx"      # while the VIP itself forwards
    c = h.counters()
    assert (c["pass"], c["tx"], c["rx_packets"]) == (1, 1, 2)


def test_vip_filter_follows_the_services(h):
    service(h, [(B1, 1)])
    service(h, [(B1, 1)], port=53, proto="udp")
    assert filter_bit(h, VIP) == 1
    h.dp.delete_service(VIP, 53, "udp")
    assert filter_bit(h, VIP) == 1        # the VIP still has a service
    h.dp.delete_service(VIP, 80, "tcp")
    assert not any(int.from_bytes(w, "little")
                   for w in h.dp.maps["vip_filter"].lookup_range(0, L.VIP_FILTER_WORDS))


# ---- 2. forward -------------------------------------------------------------
def test_forward_tcp_rewrites_only_macs(h):
    service(h, [(B1, 1)])
    frame = bytes(tcp(payload=b"hello"))
    verdict, out = h.run(frame)
    assert verdict == "tx"
    assert out == rewrite_macs(frame, mac_for(B1))
    c = h.counters()
    assert (c["tx"], c["new_flows"], c["pass"]) == (1, 1, 0)


def test_forward_udp(h):
    service(h, [(B2, 1)], port=53, proto="udp")
    frame = bytes(udp())
    verdict, out = h.run(frame)
    assert (verdict, out) == ("tx", rewrite_macs(frame, mac_for(B2)))


def test_vlan_id_rewritten_on_trunk(h):
    h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1, vlan=20)])
    frame = bytes(Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / Dot1Q(vlan=10, prio=5) /
                  IP(src=CLIENT, dst=VIP) / TCP(dport=80))
    verdict, out = h.run(frame)
    want = bytes(Ether(src=BALANCER_MAC, dst=mac_for(B1)) / Dot1Q(vlan=20, prio=5) /
                 IP(src=CLIENT, dst=VIP) / TCP(dport=80))
    assert (verdict, out) == ("tx", want)


def test_untagged_frame_for_vlan_destination_is_dropped(h):
    h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1, vlan=20)])
    verdict = h.run(tcp())[0]
    assert verdict == "drop"
    assert h.counters()["drop_vlan"] == 1


# ---- 3. selection -------------------------------------------------------------
def test_new_flows_follow_weighted_maglev(h):
    dests = [(B1, 1), (B2, 2), (B3, 3)]
    service(h, dests)
    seen = {}
    for sport in range(20000, 20300):
        verdict, out = h.run(tcp(sport=sport))
        assert verdict == "tx"
        got = dest_of(out)
        assert got == expected_dest(dests, SIZE, CLIENT, VIP, sport, 80)
        seen[got] = seen.get(got, 0) + 1
    assert set(seen) == {B1, B2, B3}
    assert seen[B3] > seen[B1]


def test_sticky_service_hashes_addresses_only(h):
    dests = [(B1, 1), (B2, 1), (B3, 1)]
    service(h, dests, sticky=True)
    for client in ("198.51.100.%d" % i for i in range(1, 40)):
        outs = {dest_of(h.run(tcp(src=client, sport=p))[1]) for p in (1000, 2000, 3000)}
        assert outs == {expected_dest(dests, SIZE, client, VIP, 0, 80)}


# ---- 4. affinity ----------------------------------------------------------------
def test_flow_keeps_destination_across_changes_and_reselects_when_removed(h):
    service(h, [(B1, 1), (B2, 1)])
    ports = range(30000, 30100)
    first = {p: dest_of(h.run(tcp(sport=p))[1]) for p in ports}
    # Adding a destination and re-weighting changes the table...
    service(h, [(B1, 5), (B2, 1), (B3, 1)])
    moved = [p for p in ports
             if expected_dest([(B1, 5), (B2, 1), (B3, 1)], SIZE, CLIENT, VIP, p, 80) != first[p]]
    assert moved, "the change should move some new flows"
    # ...but every established flow keeps its destination.
    assert {p: dest_of(h.run(tcp(sport=p, flags="A"))[1]) for p in ports} == first
    # Remove B2: its flows pick again, among the remaining destinations.
    service(h, [(B1, 5), (B3, 1)])
    before = h.counters()["flow_reselect"]
    for p in ports:
        got = dest_of(h.run(tcp(sport=p, flags="A"))[1])
        if first[p] == B2:
            assert got == expected_dest([(B1, 5), (B3, 1)], SIZE, CLIENT, VIP, p, 80)
        else:
            assert got == first[p]
    assert h.counters()["flow_reselect"] - before == list(first.values()).count(B2)


def _write_flow(h, sport, dest, age_s):
    svc = h.dp.service(VIP, 80, "tcp")
    slot = [d["slot"] for d in svc["destinations"] if d["address"] == dest][0]
    key = L.FlowKey(saddr=L.be32(CLIENT), daddr=L.be32(VIP), sport=L.be16(sport),
                    dport=L.be16(80), proto=6)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    val = L.FlowVal(last_seen=now - int(age_s * 1e9), svc_index=svc["index"], dest_slot=slot,
                    dest_addr=L.be32(dest))
    h.dp.maps["flows"].update(bytes(key), bytes(val))


def test_idle_flow_expires_and_reselects(h):
    dests = [(B1, 1), (B2, 1)]
    service(h, dests)
    sport = 41000
    maglev = expected_dest(dests, SIZE, CLIENT, VIP, sport, 80)
    other = B2 if maglev == B1 else B1
    _write_flow(h, sport, other, age_s=1)       # fresh: kept
    assert dest_of(h.run(tcp(sport=sport, flags="A"))[1]) == other
    before = h.counters()["flow_reselect"]
    _write_flow(h, sport, other, age_s=6)       # older than tcp_timeout=5
    assert dest_of(h.run(tcp(sport=sport, flags="A"))[1]) == maglev
    assert h.counters()["flow_reselect"] == before + 1   # the record was replaced


# ---- 5. drain ---------------------------------------------------------------------
def test_drain_keeps_existing_flows_and_takes_no_new_ones(h):
    service(h, [(B1, 1), (B2, 1)])
    first = {p: dest_of(h.run(tcp(sport=p))[1]) for p in range(1000, 1100)}
    assert B1 in first.values()
    service(h, [(B1, 0), (B2, 1)])
    assert {p: dest_of(h.run(tcp(sport=p, flags="A"))[1]) for p in first} == first
    new = {dest_of(h.run(tcp(sport=p))[1]) for p in range(5000, 5300)}
    assert new == {B2}


# ---- 6. unroutable VIP traffic --------------------------------------------------------
def test_unconfigured_port_dropped(h):
    service(h, [(B1, 1)])
    assert h.run(tcp(dport=81))[0] == "drop"
    assert h.run(udp(dport=80))[0] == "drop"
    assert h.counters()["drop_no_service"] == 2


@pytest.mark.parametrize("dests", [[], [(B1, 0), (B2, 0)]])
def test_service_without_eligible_destination_dropped(h, dests):
    service(h, dests)
    assert h.run(tcp())[0] == "drop"
    c = h.counters()
    assert (c["drop_no_dest"], c["new_flows"]) == (1, 0)


# ---- 7. ICMP ------------------------------------------------------------------------------
def test_echo_request_answered(h):
    service(h, [(B1, 1)])
    req = Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src=CLIENT, dst=VIP, ttl=17, id=7) / \
        ICMP(type=8, id=0x1234, seq=3) / b"ping-payload"
    verdict, out = h.run(bytes(req))
    want = Ether(src=BALANCER_MAC, dst=CLIENT_MAC) / IP(src=VIP, dst=CLIENT, ttl=64, id=7) / \
        ICMP(type=0, id=0x1234, seq=3) / b"ping-payload"
    assert (verdict, out) == ("tx", bytes(want))
    assert h.counters()["icmp_echo_reply"] == 1


def test_frag_needed_goes_to_flow_owner(h):
    dests = [(B1, 1), (B2, 1), (B3, 1)]
    service(h, dests)
    sport = 45678
    owner = dest_of(h.run(tcp(sport=sport))[1])
    # The backend's reply (VIP:80 -> client:sport) was too big for a router.
    quoted = IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=sport, flags="A")
    ptb = Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src="192.0.2.254", dst=VIP) / \
        ICMP(type=3, code=4, nexthopmtu=1400) / bytes(quoted)[:28]
    verdict, out = h.run(bytes(ptb))
    assert (verdict, out) == ("tx", rewrite_macs(ptb, mac_for(owner)))
    assert h.counters()["icmp_ptb_forwarded"] == 1


@pytest.mark.parametrize("icmp", [ICMP(type=13), ICMP(type=3, code=3), ICMP(type=0)])
def test_other_icmp_to_vip_dropped(h, icmp):
    service(h, [(B1, 1)])
    frame = Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src=CLIENT, dst=VIP) / icmp / (b"\0" * 28)
    assert h.run(bytes(frame))[0] == "drop"
    assert h.counters()["drop_icmp"] == 1


# ---- 8. options and fragments ----------------------------------------------------------
def test_ip_options_parsed_past(h):
    service(h, [(B1, 1)])
    frame = bytes(tcp(options=[IPOption_RR()], payload=b"data"))
    assert h.run(frame) == ("tx", rewrite_macs(frame, mac_for(B1)))


def _fragments(src, sport, dport=80):
    pkt = IP(src=src, dst=VIP, id=99) / UDP(sport=sport, dport=dport) / (b"z" * 120)
    return [bytes(Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / f) for f in fragment(pkt, fragsize=48)]


def test_fragments_of_sticky_service_follow_first(h):
    dests = [(B1, 1), (B2, 1), (B3, 1)]
    service(h, dests, port=80, proto="udp", sticky=True)
    for i in range(1, 20):
        client = "198.51.100.%d" % i
        frags = _fragments(client, 5000 + i)
        assert len(frags) >= 3
        outs = [h.run(f) for f in frags]
        assert {o[0] for o in outs} == {"tx"}
        owner = expected_dest(dests, SIZE, client, VIP, 0, 80, 17)
        assert [o[1] for o in outs] == [rewrite_macs(f, mac_for(owner)) for f in frags]


def test_later_fragments_of_non_sticky_service_dropped(h):
    service(h, [(B1, 1)], port=80, proto="udp")
    frags = _fragments(CLIENT, 5000)
    assert h.run(frags[0])[0] == "tx"
    assert [h.run(f)[0] for f in frags[1:]] == ["drop"] * (len(frags) - 1)
    assert h.counters()["drop_fragment"] == len(frags) - 1


# ---- 9. counters ------------------------------------------------------------------------------
def test_service_destination_and_prefix_counters(h):
    service(h, [(B1, 1)])
    frames = [bytes(tcp(sport=p, src="198.51.100.%d" % (p % 5 + 1))) for p in range(100, 110)]
    for f in frames:
        h.run(f)
    h.run(tcp(sport=100, src="198.51.100.1", flags="A"))   # established: not a new flow
    size = len(frames[0])
    svc = h.dp.service(VIP, 80, "tcp")
    want = {"packets": 11, "bytes": 11 * size, "new_flows": 10}
    assert h.dp.service_stats(svc["index"]) == want
    assert h.dp.dest_stats(svc["index"], svc["destinations"][0]["slot"]) == want
    h.run(tcp(sport=100, src="192.0.2.77", flags="A"))     # another /20, one packet
    assert h.dp.busiest_prefixes(5) == [{"prefix": "198.51.96.0/20", "packets": 11},
                                        {"prefix": "192.0.0.0/20", "packets": 1}]
    assert h.dp.busiest_prefixes(1) == [{"prefix": "198.51.96.0/20", "packets": 11}]
    c = h.counters()
    assert sum(c[k] for k in L.VERDICT_COUNTERS) == c["rx_packets"] == 12


# ---- 10. atomic updates -----------------------------------------------------------------------
def test_every_intermediate_state_forwards_to_a_live_destination(h, monkeypatch):
    """Probe the data plane after every single map write of a change: each
    new flow must go where the old or the new table sends it, never to a
    half-written table or a slot that now holds another backend."""
    from ansible_collections.xvs.lb.plugins.module_utils import _bpf
    old, new = [(B1, 1), (B2, 1)], [(B2, 3), (B3, 1)]
    service(h, old)
    ports = range(60000, 60030)
    allowed = {p: {expected_dest(old, SIZE, CLIENT, VIP, p, 80),
                   expected_dest(new, SIZE, CLIENT, VIP, p, 80)} for p in ports}
    busy, probes = [], []

    def probe():
        busy.append(1)
        try:
            for p in ports:
                for k in h.dp.maps["flows"].keys():   # every probe is a new flow
                    h.dp.maps["flows"].delete(k)
                verdict, out = h.run(tcp(sport=p))
                assert verdict == "tx", "a frame was %s mid-update" % verdict
                assert dest_of(out) in allowed[p]
            probes.append(1)
        finally:
            busy.pop()

    for name in ("update", "update_batch", "delete"):
        def wrapped(self, *a, _orig=getattr(_bpf.Map, name), **kw):
            r = _orig(self, *a, **kw)
            if not busy:
                probe()
            return r
        monkeypatch.setattr(_bpf.Map, name, wrapped)
    h.dp.set_service(VIP, 80, "tcp", False, [h.dest(a, w) for a, w in new])
    monkeypatch.undo()
    assert len(probes) >= 4
    for k in h.dp.maps["flows"].keys():
        h.dp.maps["flows"].delete(k)
    assert {p: dest_of(h.run(tcp(sport=p))[1]) for p in ports} == \
        {p: expected_dest(new, SIZE, CLIENT, VIP, p, 80) for p in ports}


# ---- 12. limits ---------------------------------------------------------------------------------
def test_too_many_destinations_refused_with_nothing_changed(h):
    service(h, [(B1, 1)])
    before = dump_maps(h.root)
    many = [h.dest("192.0.2.%d" % i, 1) for i in range(100, 117)]  # 17 > max_destinations=16
    with pytest.raises(_dataplane.LimitError, match="max_destinations=16"):
        h.dp.set_service(VIP, 80, "tcp", False, many)
    assert dump_maps(h.root) == before


def test_too_many_services_refused_with_nothing_changed(h):
    for port in range(1, 9):
        service(h, [(B1, 1)], port=port)
    before = dump_maps(h.root)
    with pytest.raises(_dataplane.LimitError, match="max_services=8"):
        service(h, [(B1, 1)], port=9)
    assert dump_maps(h.root) == before


def test_unchanged_service_writes_nothing(h):
    service(h, [(B1, 1), (B2, 2)])
    assert h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1), h.dest(B2, 2)]) is False
    assert h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1), h.dest(B2, 3)]) is True


# ---- 2. forward through another attached interface (devmap redirect) --------------------
def test_redirect_to_other_interface(pin_root):
    from ansible_collections.xvs.lb.plugins.module_utils import _loader, _netinfo
    from xvstest.lab import Lab, inside
    with Lab("xr") as lab:
        ns = lab.add("bal")
        lab.veth(ns, "in0", ns, "in1")
        lab.veth(ns, "out0", ns, "out1")
        with inside(ns), harness(pin_root) as h:
            ingress = _netinfo.interface("in0")
            egress = _netinfo.interface("out0")
            _loader._set_tx_port(pin_root, egress["index"])
            port = h.dp.tx_port(egress["index"])
            assert port is not None
            h.dp.set_service(VIP, 80, "tcp", False,
                             [h.dest(B1, 1, ifindex=egress["index"], tx_port=port)])
            frame = bytes(tcp())
            verdict, out = h.run(frame, ifindex=ingress["index"])
            assert (verdict, out) == ("redirect", rewrite_macs(frame, mac_for(B1)))
            # arriving on the destination's own interface: straight back out
            verdict = h.run(frame, ifindex=egress["index"])[0]
            assert verdict == "tx"
            c = h.counters()
            assert (c["redirect"], c["tx"]) == (1, 1)


def test_duplicate_destination_refused_with_nothing_changed(h):
    service(h, [(B1, 1)])
    before = dump_maps(h.root)
    with pytest.raises(_dataplane.DataPlaneError, match="192.0.2.22 listed more than once"):
        h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1), h.dest(B2, 1), h.dest(B2, 2)])
    assert dump_maps(h.root) == before
