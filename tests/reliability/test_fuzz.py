"""Packet fuzzing through BPF_PROG_TEST_RUN.

Two sources of frames, both checked frame by frame against the same
invariants, which come from the contract and not from the program:

* random mutation of valid frames: truncation at every offset, bad IHL
  and lengths, fragments, options, stacked and odd VLAN tags, odd
  ethertypes, ICMP errors quoting garbage, random byte flips;
* hypothesis, building frames field by field.

Invariants:
* a frame whose IPv4 or IPv6 destination is not a VIP (or that is
  neither) passes, byte for byte unchanged;
* a forwarded frame goes to the MAC of a destination the service has now,
  with everything after the MACs unchanged but the 802.1Q id; a tunnelled
  one goes to the next hop with an outer header to a current destination
  in front of the client's unchanged packet; the only other XDP_TX are an
  ICMP echo reply and a fragmentation-needed quoting the frame, back to the
  sender's MAC;
* no frame changes length but by a tunnel's header or into that ICMP
  reply, none aborts;
* the counters add up: every frame run is counted in rx_packets and in
  exactly one verdict counter, matching the verdicts seen.

XVS_FUZZ_FRAMES sets the mutation run's length (default 200,000: the
CI run); docs/reliability.md records a longer one.
"""
import collections
import ipaddress
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, fragment6)
from scapy.layers.l2 import ARP, Dot1Q, Ether

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L
from xvstest.packets import BALANCER_MAC, CLIENT, CLIENT_MAC, TEST_SIZES, VIP, harness, mac_for

VIP2 = "203.0.113.20"            # a VIP whose only service has no destinations
VIP6 = "2001:db8:100::10"        # an IPv6 VIP: a TCP and a sticky UDP service
POOL6 = ["2001:db8::21", "2001:db8::22"]
VIPS = {VIP, VIP2, VIP6}
POOLS = [["192.0.2.21", "192.0.2.22", "192.0.2.23"], ["192.0.2.22", "192.0.2.24"],
         ["192.0.2.25"]]
TAGGED = ["192.0.2.31", "192.0.2.32"]
# tunnelled services: GUE on TCP 8443 and IPIP on UDP 5353, to routed
# destinations through one next hop, with an MTU small enough that the
# fuzzed frames cross it
ROUTED = ["198.51.100.21", "198.51.100.22"]
NEXT_HOP_MAC = "02:00:00:00:00:fe"
TUN_SRC = "192.0.2.2"
TUN_MTU = 200
TUNNELS = {(8443, "tcp"): "gue", (5353, "udp"): "ipip"}
GUE_PORT = 6080
# and for IPv6 the same two, with the least MTU a tunnel may have so that
# a large seed crosses it
ROUTED6 = ["2001:db8:2::21", "2001:db8:2::22"]
TUN_SRC6 = "2001:db8:1::2"
TUN_MTU6 = L.IPV6_MIN_MTU + 48
FRAMES = int(os.environ.get("XVS_FUZZ_FRAMES", "200000"))
# BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header
# (EINVAL), so truncation starts there.
MIN_FRAME = 14
CLIENT6 = "2001:db8:200::7"
SIZES = dict(TEST_SIZES, max_services=16)    # the services above


class Checker(object):
    """Runs frames and checks every invariant; reconfigures on request."""

    def __init__(self, h):
        self.h = h
        self.seen = collections.Counter()
        self.frames = 0
        self.configure(0)
        h.dp.set_service(VIP, 53, "udp", True, [h.dest(a) for a in POOLS[0]])
        h.dp.set_service(VIP, 8080, "tcp", False, [h.dest(a, vlan=10) for a in TAGGED])
        h.dp.set_service(VIP2, 80, "tcp", False, [])
        h.dp.set_service(VIP6, 80, "tcp", False, [h.dest(a) for a in POOL6])
        h.dp.set_service(VIP6, 53, "udp", True, [h.dest(a) for a in POOL6])
        for (port, proto), forwarding in TUNNELS.items():
            h.dp.set_service(VIP, port, proto, False, [dict(h.dest(a), mac=NEXT_HOP_MAC, tun_src=TUN_SRC,
                                                            mtu=TUN_MTU) for a in ROUTED],
                             {"method": forwarding, "gue_port": GUE_PORT})
            h.dp.set_service(VIP6, port, proto, False, [dict(h.dest(a), mac=NEXT_HOP_MAC, tun_src=TUN_SRC6,
                                                             mtu=TUN_MTU6) for a in ROUTED6],
                             {"method": forwarding, "gue_port": GUE_PORT})
        self.tagged_macs = {L.mac_bytes(mac_for(a)) for a in TAGGED + POOL6}

    def configure(self, n):
        """Move the TCP:80 service to another destination set: flows pinned
        to a removed destination must not be sent there any more."""
        pool = POOLS[n % len(POOLS)]
        self.h.dp.set_service(VIP, 80, "tcp", False, [self.h.dest(a) for a in pool])
        self.macs = {L.mac_bytes(mac_for(a)) for a in set(pool) | set(POOLS[0])}

    def run(self, raw):
        verdict, out = self.h.run(raw)
        self.frames += 1
        self.seen[verdict] += 1
        assert verdict in ("pass", "tx", "drop", "redirect"), (verdict, raw.hex())
        assert len(out) == len(raw) or verdict == "tx", raw.hex()
        if not for_vip(raw):
            assert verdict == "pass" and out == raw, ("non-VIP frame changed", verdict, raw.hex())
        if verdict == "tx":
            self.check_tx(raw, out)
        elif verdict != "redirect":
            assert out == raw, ("a passed or dropped frame was changed", raw.hex())
        return verdict

    def check_tx(self, raw, out):
        off = l3_offset(raw)
        off6 = l3_offset(raw, b"\x86\xdd")
        if len(out) > len(raw):
            return self.check_tunnel(raw, out, off) if off else self.check_tunnel6(raw, out, off6)
        if out[0:6] == raw[6:12] and ip_src(out) in VIPS:
            if len(out) < len(raw) and off:          # fragmentation-needed, quoting the frame
                icmp = IP(out[off:])
                assert (icmp.proto, icmp[ICMP].type, icmp[ICMP].code) == (1, 3, 4), raw.hex()
                assert icmp[ICMP].nexthopmtu in (TUN_MTU - 20, TUN_MTU - 28)
                assert out[off + 28:] == raw[off:off + L.ICMP_QUOTE_LEN] and out[12:off] == raw[12:off]
            elif len(out) < len(raw):                # Packet Too Big, quoting the frame
                ptb = IPv6(out[off6:])
                assert (ptb.nh, ptb[ICMPv6PacketTooBig].mtu) in ((58, TUN_MTU6 - 40), (58, TUN_MTU6 - 48))
                assert out[off6 + 48:] == raw[off6:off6 + L.ICMP_QUOTE_LEN] and out[12:off6] == raw[12:off6]
                ptb[ICMPv6PacketTooBig].cksum = None
                assert bytes(ptb) == out[off6:], raw.hex()
                self.seen["packet_too_big"] += 1
            else:
                assert len(out) == len(raw)
            return                                   # ICMP echo reply to the sender
        assert out[0:6] in self.macs | self.tagged_macs, ("forwarded to a MAC that is not a current "
                                                          "destination", out[0:6].hex(), raw.hex())
        assert out[6:12] == L.mac_bytes(BALANCER_MAC)
        if raw[12:14] == b"\x81\x00":
            assert out[12:14] == raw[12:14] and out[14] & 0xf0 == raw[14] & 0xf0 and out[16:] == raw[16:]
        else:
            assert out[12:] == raw[12:]

    def check_tunnel(self, raw, out, off):
        overhead = len(out) - len(raw)
        assert overhead in (20, 28), raw.hex()
        assert out[0:6] == L.mac_bytes(NEXT_HOP_MAC) and out[6:12] == L.mac_bytes(BALANCER_MAC)
        assert out[12:off] == raw[12:off] and out[off + overhead:] == raw[off:]
        outer = IP(out[off:off + 20])
        assert (outer.src, outer.dst in ROUTED, outer.proto, outer.ttl, outer.flags) == \
            (TUN_SRC, True, 4 if overhead == 20 else 17, 64, 2), raw.hex()
        assert IP(bytes(outer)).chksum == outer.chksum

    def check_tunnel6(self, raw, out, off):
        """IPv6-in-IPv6 or GUE over IPv6 to a current destination, and for
        GUE a UDP checksum a receiver accepts (scapy sums it the same)."""
        overhead = len(out) - len(raw)
        assert overhead in (40, 48), raw.hex()
        self.seen["ip6ip6" if overhead == 40 else "gue6"] += 1
        assert out[0:6] == L.mac_bytes(NEXT_HOP_MAC) and out[6:12] == L.mac_bytes(BALANCER_MAC)
        assert out[12:off] == raw[12:off] and out[off + overhead:] == raw[off:]
        outer = IPv6(out[off:])
        assert (outer.src, outer.dst in ROUTED6, outer.nh, outer.hlim) == \
            (TUN_SRC6, True, 41 if overhead == 40 else 17, 64), raw.hex()
        if overhead == 48:
            assert outer[UDP].dport == GUE_PORT and outer[UDP].len == outer.plen
            end = off + 40 + outer.plen              # what the datagram covers (the frame may be padded)
            datagram = IPv6(out[off:end])
            datagram[UDP].chksum = None
            assert bytes(datagram) == out[off:end], raw.hex()

    def check_counters(self):
        c = self.h.counters()
        assert c["rx_packets"] == self.frames
        assert sum(c[name] for name in L.VERDICT_COUNTERS) == self.frames
        assert c["pass"] == self.seen["pass"]
        assert c["tx"] + c["icmp_echo_reply"] + c["icmp_too_big"] == self.seen["tx"]
        assert c["redirect"] == self.seen["redirect"]
        assert sum(c[n] for n in L.VERDICT_COUNTERS if n.startswith("drop_")) == self.seen["drop"]


def l3_offset(raw, etype=b"\x08\x00"):
    """Where the IPv4 (or, with etype 86dd, IPv6) header would start, or
    None when the frame is not that (at most one 802.1Q tag is looked
    through, as the contract says)."""
    if len(raw) < 14:
        return None
    if raw[12:14] == etype:
        return 14
    if raw[12:14] == b"\x81\x00" and raw[16:18] == etype:
        return 18
    return None


def _addresses(raw):
    """(source, destination) of the frame's IPv4 or IPv6 header, or None."""
    off = l3_offset(raw)
    if off is not None and len(raw) >= off + 20:
        return ip_str(raw[off + 12:off + 16]), ip_str(raw[off + 16:off + 20])
    off = l3_offset(raw, b"\x86\xdd")
    if off is not None and len(raw) >= off + 40:
        return (str(ipaddress.IPv6Address(raw[off + 8:off + 24])),
                str(ipaddress.IPv6Address(raw[off + 24:off + 40])))
    return None


def for_vip(raw):
    a = _addresses(raw)
    return a is not None and a[1] in VIPS


def ip_src(raw):
    a = _addresses(raw)
    return a and a[0]


def ip_str(b):
    return ".".join(str(x) for x in b)


def eth(vlan=None, etype=None):
    e = Ether(src=CLIENT_MAC, dst=BALANCER_MAC)
    if etype:
        e.type = etype
    return e / Dot1Q(vlan=vlan) if vlan is not None else e


def seeds():
    """Valid frames of every kind the program distinguishes."""
    ip = IP(src=CLIENT, dst=VIP)
    reply = IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000)
    out = [
        eth() / ip / TCP(sport=40000, dport=80, flags="S"),
        eth() / ip / TCP(sport=40001, dport=80, flags="A") / (b"d" * 40),
        eth() / IP(src=CLIENT, dst=VIP, options=[IPOption_RR()]) / TCP(sport=40002, dport=80),
        eth() / ip / UDP(sport=5353, dport=53) / b"query",
        eth() / ip / TCP(sport=40003, dport=81),
        eth(10) / ip / TCP(sport=40004, dport=8080, flags="S"),
        eth(10) / Dot1Q(vlan=20) / ip / TCP(sport=40005, dport=8080),
        eth(etype=0x88A8) / Dot1Q(vlan=10) / ip / TCP(dport=80),
        eth() / ip / ICMP(type=8, id=1, seq=1) / b"ping",
        eth() / ip / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(reply)[:28],
        eth() / ip / ICMP(type=3, code=4) / (b"\x45" + bytes(27)),
        eth() / ip / ICMP(type=11) / b"garbage",
        eth() / IP(src=CLIENT, dst="192.0.2.99") / TCP(dport=80),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40020, dport=80, flags="S"),
        eth(10) / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40021, dport=80, flags="A") / b"d",
        eth() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=40022, dport=53),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoRequest(data=b"ping"),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / ICMPv6PacketTooBig() / bytes(
            IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40020)),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / ICMPv6ND_NS(tgt=VIP6),
        eth() / IPv6(src=CLIENT6, dst="2001:db8:100::99") / TCP(dport=80),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40024, dport=8443, flags="S"),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40025, dport=8443, flags="A") / (b"t" * 1260),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=40026, dport=5353) / (b"u" * 1250),
        eth() / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=40027, dport=5353) / b"q",
        eth() / ip / TCP(sport=40008, dport=8443, flags="S"),
        eth() / ip / TCP(sport=40009, dport=8443, flags="A") / (b"t" * 300),
        eth() / ip / UDP(sport=40010, dport=5353) / b"q",
        eth() / ip / UDP(sport=40011, dport=5353) / (b"u" * 300),
        eth() / IP(src=CLIENT, dst=VIP2) / TCP(sport=40006, dport=80),
        eth() / ARP(psrc=CLIENT, pdst=VIP),
        eth() / (b"\x60" + bytes(60)),
    ]
    out += [eth() / f for f in fragment(ip / UDP(sport=5353, dport=53) / (b"x" * 64), fragsize=32)]
    out += [eth() / f for f in fragment(ip / TCP(sport=40007, dport=80) / (b"y" * 64), fragsize=32)]
    out += [eth() / f for f in fragment6(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment() /
                                         UDP(sport=40023, dport=53) / (b"x" * 200), 120)]
    return [bytes(f) for f in out]


def mutate(rng, raw):
    """One mutation of a valid frame, chosen at random."""
    b = bytearray(raw)
    off = l3_offset(raw) or 14
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(b[:rng.randrange(MIN_FRAME, len(b) + 1)])
    if kind == 1 and len(b) > off:
        b[off] = (b[off] & 0xf0) | rng.randrange(16)                   # IHL
    elif kind == 2 and len(b) > off + 3:
        struct.pack_into("!H", b, off + 2, rng.randrange(65536))      # total length
    elif kind == 3 and len(b) > off + 7:
        struct.pack_into("!H", b, off + 6, rng.randrange(65536))      # flags, fragment offset
    elif kind == 4:
        tags = b"".join(rng.choice([b"\x81\x00", b"\x88\xa8", b"\x91\x00"]) + bytes(
            [rng.randrange(256), rng.randrange(256)]) for dummy in range(rng.randrange(1, 4)))
        b[12:12] = tags                                                # stacked and odd tags
    elif kind == 5:
        b[12:14] = rng.choice([b"\x08\x06", b"\x86\xdd", b"\x88\xcc", b"\x00\x00",
                               bytes([rng.randrange(256), rng.randrange(256)])])
    elif kind == 6 and len(b) > off + 9:
        b[off + 9] = rng.choice([1, 6, 17, 47, 132, rng.randrange(256)])  # protocol
    elif kind == 7 and len(b) > off + 20:
        del b[off + 20:]
        b += bytes(rng.randrange(256) for dummy in range(rng.randrange(40)))  # garbage L4
    else:
        for dummy in range(rng.randrange(1, 5)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
    return bytes(b)


@pytest.fixture
def checker(pin_root):
    with harness(pin_root, sizes=SIZES) as h:
        yield Checker(h)


def test_truncation_at_every_offset(checker):
    n = 0
    for raw in seeds():
        for cut in range(MIN_FRAME, len(raw) + 1):
            checker.run(raw[:cut])
            n += 1
    checker.check_counters()
    assert n > 1000


def test_random_mutations(checker):
    rng = random.Random(int(os.environ.get("XVS_FUZZ_SEED", "6")))
    corpus = seeds()
    verdicts = collections.Counter()
    for i in range(FRAMES):
        if i and i % 20000 == 0:
            checker.configure(i // 20000)
            checker.check_counters()
        raw = rng.choice(corpus)
        for dummy in range(rng.choice((1, 1, 1, 2, 3))):
            raw = mutate(rng, raw)
        verdicts[checker.run(raw)] += 1
    checker.check_counters()
    # the run reached every outcome: otherwise it fuzzed only one path
    assert verdicts["pass"] and verdicts["tx"] and verdicts["drop"], verdicts
    c = checker.h.counters()
    assert c["encap_gue"] and c["encap_ipip"] and c["icmp_too_big"], c     # and every tunnel path,
    assert checker.seen["gue6"] and checker.seen["ip6ip6"] and checker.seen["packet_too_big"]   # IPv6's too
    v6 = checker.h.dp.service(VIP6, 80, "tcp")
    assert checker.h.dp.service_stats(v6["index"])["packets"], "no IPv6 frame was forwarded"
    print("fuzzed %d frames: %s" % (FRAMES, dict(verdicts)))


_byte = st.integers(0, 255)


@st.composite
def frames(draw):
    """A frame built field by field: any ethertype and tags, an IPv4
    header with any IHL, lengths, flags and protocol to one of the VIPs or
    elsewhere, ports, and a tail; then maybe cut short."""
    b = bytearray(L.mac_bytes(BALANCER_MAC) + L.mac_bytes(CLIENT_MAC))
    for dummy in range(draw(st.integers(0, 2))):
        tci = bytes(draw(st.lists(_byte, min_size=2, max_size=2)))
        b += draw(st.sampled_from([b"\x81\x00", b"\x88\xa8"])) + tci
    b += draw(st.sampled_from([b"\x08\x00", b"\x08\x00", b"\x08\x06", b"\x86\xdd"]))
    if b[-2:] == b"\x86\xdd" and draw(st.booleans()):
        return draw(ipv6_tail(b))
    ihl = draw(st.sampled_from([5, 5, 5, 6, 15, 4, 0]))
    dst = draw(st.sampled_from([VIP, VIP, VIP2, "192.0.2.99"]))
    proto = draw(st.sampled_from([6, 17, 1, 47]))
    frag = draw(st.sampled_from([0, 0, 0x2000, 0x0004, 0x2004, 0x4000, draw(st.integers(0, 65535))]))
    options = bytes(draw(st.lists(_byte, min_size=max(0, ihl - 5) * 4, max_size=max(0, ihl - 5) * 4)))
    l4 = bytes(draw(st.binary(max_size=60)))
    if proto in (6, 17) and draw(st.booleans()):
        l4 = struct.pack("!HH", draw(st.integers(0, 65535)), draw(st.sampled_from([80, 53, 8080, 81, 8443, 5353])))\
            + l4
    tot = 4 * ihl + len(l4) if draw(st.booleans()) else draw(st.integers(0, 65535))
    b += struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot & 0xffff, 1, frag, draw(st.integers(0, 255)),
                     proto, 0, bytes(int(o) for o in CLIENT.split(".")), bytes(int(o) for o in dst.split(".")))
    b += options + l4
    return bytes(b[:draw(st.integers(MIN_FRAME, len(b)))]) if draw(st.integers(0, 4)) == 0 else bytes(b)


@st.composite
def ipv6_tail(draw, head):
    """An IPv6 header (any version nibble, payload length, next header and
    hop limit) to the IPv6 VIP or elsewhere, then extension headers of any
    length, ports and a tail; maybe cut short."""
    b = bytearray(head)
    chain = draw(st.lists(st.sampled_from([0, 43, 60, 44, 51]), max_size=6))
    last = draw(st.sampled_from([6, 17, 58, 132]))
    rest = bytearray()
    for i, h in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else last
        body = bytes(draw(st.binary(min_size=6, max_size=22)))
        rest += bytes([nxt, draw(st.integers(0, 3))]) + body
    if last in (6, 17) and draw(st.booleans()):
        rest += struct.pack("!HH", draw(st.integers(0, 65535)), draw(st.sampled_from([80, 53, 81])))
    rest += bytes(draw(st.binary(max_size=40)))
    dst = draw(st.sampled_from([VIP6, VIP6, "2001:db8:100::99"]))
    plen = len(rest) if draw(st.booleans()) else draw(st.integers(0, 65535))
    version = 6 if draw(st.integers(0, 5)) else draw(st.integers(0, 15))
    b += struct.pack("!IHBB16s16s", version << 28, plen, chain[0] if chain else last,
                     draw(st.sampled_from([64, 1, 0])), ipaddress.IPv6Address(CLIENT6).packed,
                     ipaddress.IPv6Address(dst).packed) + rest
    return bytes(b[:draw(st.integers(MIN_FRAME, len(b)))]) if draw(st.integers(0, 4)) == 0 else bytes(b)


@pytest.fixture(scope="module")
def module_checker(bpffs):
    from ansible_collections.xvs.lb.plugins.module_utils import _loader
    root = os.path.join(bpffs, "fuzz_hypothesis")
    try:
        with harness(root, sizes=SIZES) as h:
            yield Checker(h)
    finally:
        _loader.unpin_all(root)


@settings(max_examples=int(os.environ.get("XVS_FUZZ_EXAMPLES", "3000")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=frames())
def test_hypothesis_frames(module_checker, raw):
    module_checker.run(raw)
    module_checker.check_counters()
