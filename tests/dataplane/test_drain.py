"""Contract 5, frame by frame, for both families and sticky or not: a new
connection never reaches a destination of weight 0, whatever tuple it
reuses; a drain keeps established connections; a failing destination (the
health check's mask) keeps nothing, TCP or UDP; a SYN retransmit of a
healthy destination's flow keeps it.  Verdicts, exact output bytes and the
counters each frame moves, through BPF_PROG_TEST_RUN."""
import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether

from xvstest.packets import BALANCER_MAC, CLIENT_MAC, dest_of, expected_dest, harness, mac_for, rewrite_macs

SIZE = 251  # the test build's maglev_table_size
FAMILIES = {
    4: {"ip": IP, "vip": "203.0.113.10", "client": "198.51.100.%d",
        "dests": ("192.0.2.21", "192.0.2.22", "192.0.2.23")},
    6: {"ip": IPv6, "vip": "2001:db8:100::10", "client": "2001:db8:200::%x",
        "dests": ("2001:db8::21", "2001:db8::22", "2001:db8::23")},
}


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def fam(request, pin_root):
    f = dict(FAMILIES[request.param], version=request.param)
    with harness(pin_root) as h:
        f["h"] = h
        yield f


def frame(f, client, sport, flags="S", proto="tcp", payload=b""):
    l4 = TCP(sport=sport, dport=80, flags=flags) if proto == "tcp" else UDP(sport=sport, dport=80)
    return bytes(Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / f["ip"](src=client, dst=f["vip"]) / l4 / payload)


def service(f, weights, proto="tcp", sticky=False, failing=()):
    """The service at VIP:80 with destinations {address: weight}; those in
    failing are written as the planner writes a destination health masks."""
    h = f["h"]
    h.dp.set_service(f["vip"], 80, proto, sticky,
                     [dict(h.dest(a, w), failing=a in failing) for a, w in sorted(weights.items())])


def owner(f, out):
    return dest_of(out, f["dests"][0])


def send(f, raw):
    """(verdict, the destination it went to, the exact bytes it went with)."""
    verdict, out = f["h"].run(raw)
    assert verdict == "tx", verdict
    return owner(f, out), out


def table_pick(f, weights, client, sport, sticky=False, proto=6):
    return expected_dest(sorted(weights.items()), SIZE, client, f["vip"], 0 if sticky else sport, 80, proto)


def flow_to(f, weights, dest, sticky, proto=6):
    """(client, port) of a new flow the table sends to dest."""
    for i in range(1, 200):
        client = f["client"] % i
        for sport in range(40000, 40050):
            if table_pick(f, weights, client, sport, sticky, proto) == dest:
                return client, sport
    raise AssertionError("no flow to %s" % dest)


def delta(f, before):
    c = f["h"].counters()
    return {k: c[k] - before[k] for k in ("new_flows", "flow_reselect")}


@pytest.mark.parametrize("sticky", [False, True], ids=["hashed", "sticky"])
def test_a_syn_never_reaches_a_drained_destination_and_established_flows_stay(fam, sticky):
    f = fam
    b1, b2, b3 = f["dests"]
    weights = {b1: 1, b2: 1, b3: 1}
    service(f, weights, sticky=sticky)
    client, sport = flow_to(f, weights, b2, sticky)
    other = sport + 1000          # a second connection of the client, open before the drain
    assert send(f, frame(f, client, sport))[0] == b2
    assert send(f, frame(f, client, sport, "A"))[0] == b2
    if sticky:
        assert send(f, frame(f, client, other))[0] == b2           # the address pair hashes alike
    drained = dict(weights, **{b2: 0})
    service(f, drained, sticky=sticky)                              # the operator drains b2

    # established: every non-SYN packet still goes to b2, byte for byte
    ack = frame(f, client, sport, "PA", payload=b"more")
    assert send(f, ack) == (b2, rewrite_macs(ack, mac_for(b2)))
    before = f["h"].counters()
    # the client reuses the tuple for a new connection: selected again, record replaced
    syn = frame(f, client, sport)
    want = table_pick(f, drained, client, sport, sticky)
    assert want != b2
    assert send(f, syn) == (want, rewrite_macs(syn, mac_for(want)))
    assert delta(f, before) == {"new_flows": 1, "flow_reselect": 1}
    assert send(f, frame(f, client, sport, "A"))[0] == want       # the new connection stays there
    assert delta(f, before) == {"new_flows": 1, "flow_reselect": 1}
    if sticky:
        # the client's other connection, open before the drain, is not moved by the new one
        assert send(f, frame(f, client, other, "A"))[0] == b2
    # a fresh port never reaches b2 either
    assert b2 not in {send(f, frame(f, client, p))[0] for p in range(50000, 50040)}


@pytest.mark.parametrize("sticky", [False, True], ids=["hashed", "sticky"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_every_packet_of_a_failing_destinations_flows_selects_again(fam, proto, sticky):
    f = fam
    b1, b2, b3 = f["dests"]
    weights = {b1: 1, b2: 1, b3: 1}
    number = 6 if proto == "tcp" else 17
    service(f, weights, proto=proto, sticky=sticky)
    client, sport = flow_to(f, weights, b2, sticky, number)
    assert send(f, frame(f, client, sport, proto=proto))[0] == b2
    service(f, weights, proto=proto, sticky=sticky, failing={b2})     # xvs-agent masks b2
    before = f["h"].counters()
    later = frame(f, client, sport, "A", proto=proto, payload=b"more")
    want = table_pick(f, dict(weights, **{b2: 0}), client, sport, sticky, number)
    assert want != b2
    assert send(f, later) == (want, rewrite_macs(later, mac_for(want)))
    assert delta(f, before) == {"new_flows": 1, "flow_reselect": 1}
    # the flow now belongs to the live destination, and stays with it when b2 is back
    service(f, weights, proto=proto, sticky=sticky)
    assert send(f, later)[0] == want
    assert delta(f, before) == {"new_flows": 1, "flow_reselect": 1}


def test_a_syn_retransmit_keeps_a_healthy_destination(fam):
    """Only weight 0 sends a SYN elsewhere: a retransmitted SYN of a flow
    whose destination serves keeps it, though the table has moved on."""
    f = fam
    b1, b2, b3 = f["dests"]
    first = {b1: 1, b2: 1}
    service(f, first)
    later = {b1: 1, b2: 1, b3: 5}
    client, sport = next((f["client"] % 1, p) for p in range(40000, 41000)
                         if table_pick(f, first, f["client"] % 1, p) == b1
                         and table_pick(f, later, f["client"] % 1, p) == b3)
    syn = frame(f, client, sport)
    assert send(f, syn)[0] == b1
    service(f, later)
    before = f["h"].counters()
    assert send(f, syn) == (b1, rewrite_macs(syn, mac_for(b1)))
    assert delta(f, before) == {"new_flows": 0, "flow_reselect": 0}


def fragments(f, client, sport):
    if f["version"] == 4:
        pkt = IP(src=client, dst=f["vip"], id=7) / UDP(sport=sport, dport=80) / (b"z" * 120)
        frags = fragment(pkt, fragsize=48)
    else:
        pkt = IPv6(src=client, dst=f["vip"]) / IPv6ExtHdrFragment(id=7) / UDP(sport=sport, dport=80) / (b"z" * 1400)
        frags = fragment6(pkt, 600)
    return [bytes(Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / x) for x in frags]


def test_later_fragments_follow_the_first_across_a_table_change(fam):
    """Contract 8 with records per connection: the first fragment of a
    sticky service's datagram records its address pair, so the later ones
    (no ports) go where the flow's record sends the first, not where the
    table now would."""
    f = fam
    b1, b2, b3 = f["dests"]
    first, later = {b1: 1, b2: 1}, {b1: 1, b2: 1, b3: 9}
    service(f, first, proto="udp", sticky=True)
    client = next(f["client"] % i for i in range(1, 200)
                  if table_pick(f, first, f["client"] % i, 0, True, 17) == b1
                  and table_pick(f, later, f["client"] % i, 0, True, 17) == b3)
    assert send(f, frame(f, client, 5000, proto="udp"))[0] == b1      # the flow's record: b1
    service(f, later, proto="udp", sticky=True)
    frags = fragments(f, client, 5000)
    assert len(frags) >= 3
    assert [send(f, x) for x in frags] == [(b1, rewrite_macs(x, mac_for(b1))) for x in frags]
