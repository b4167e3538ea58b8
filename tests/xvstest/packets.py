"""Packet-test harness: a loaded program, BPF_PROG_TEST_RUN with a fresh
input buffer per run, and an oracle for the program's flow hash."""
import contextlib
import hashlib
import ipaddress
import os
import struct

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _dataplane, _layout as L, _loader
from ansible_collections.xvs.lb.plugins.module_utils import _maglev

# Small sizes keep the compile and the maps cheap; timeouts are short so a
# test can age a flow by writing an old timestamp.
TEST_SIZES = {"max_services": 8, "max_destinations": 16, "maglev_table_size": 251,
              "flow_table_size": 4096, "flow_table_size_v6": 4096, "tcp_timeout": 5, "udp_timeout": 5}
XDP = {"aborted": 0, "drop": 1, "pass": 2, "tx": 3, "redirect": 4}
VERDICT = {v: k for k, v in XDP.items()}

BALANCER_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:c1"
VIP = "203.0.113.10"
CLIENT = "198.51.100.7"


def mix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def flow_hash(saddr, daddr, sport, dport, proto):
    """Mirror of flow_hash() in files/xdp_lb.c, over the same raw words."""
    h = mix32(0x9E3779B9 ^ proto)
    h = mix32(h ^ ((L.be16(sport) << 16) | L.be16(dport)))
    h = mix32(h ^ L.be32(saddr))
    return mix32(h ^ L.be32(daddr))


def flow_hash6(saddr, daddr, sport, dport, proto):
    """Mirror of flow_hash6() in files/xdp_lb.c."""
    h = mix32(0x9E3779B9 ^ proto)
    h = mix32(h ^ ((L.be16(sport) << 16) | L.be16(dport)))
    for w in list(L.addr6(saddr).w) + list(L.addr6(daddr).w):
        h = mix32(h ^ w)
    return h


def expected_dest(dests, size, saddr, daddr, sport, dport, proto=6):
    """The destination Maglev gives a new flow: dests is [(address, weight)]."""
    table = _maglev.build(dests, size)
    hash_ = (flow_hash6 if ":" in daddr else flow_hash)(saddr, daddr, sport, dport, proto)
    return table[hash_ % size]


class Harness(object):
    """One loaded program under a pin root, with its DataPlane."""

    def __init__(self, root, sizes=None, source=None, allow_flow_reset=False):
        self.prog = _loader.load(root, dict(TEST_SIZES, **(sizes or {})), source, allow_flow_reset)
        self.dp = _dataplane.DataPlane(root)
        self.root = root

    def close(self):
        self.dp.close()
        self.prog.close()

    def run(self, frame, ifindex=0):
        """(verdict name, output bytes) for one frame, fresh buffer."""
        raw = bytes(frame)
        ctx = struct.pack("=6I", 0, len(raw), 0, ifindex, 0, 0) if ifindex else b""
        ret, out = _bpf.prog_test_run(self.prog.fd, raw, ctx=ctx)[:2]
        return VERDICT.get(ret, ret), out

    def counters(self):
        return self.dp.counters()

    def dest(self, address, weight=1, ifindex=1, vlan=0, tx_port=0):
        """A resolved destination on ifindex 1 (lo: test runs ingress on it)."""
        return {"address": address, "weight": weight, "mac": mac_for(address),
                "src_mac": BALANCER_MAC, "ifindex": ifindex, "vlan": vlan, "tx_port": tx_port}


def mac_for(address):
    """A distinct MAC per backend address: 02:00:<the four octets>, or for
    IPv6 02:06:<the last four bytes>."""
    if ":" in address:
        return "02:06:" + ":".join("%02x" % b for b in ipaddress.IPv6Address(address).packed[12:])
    return "02:00:" + ":".join("%02x" % int(o) for o in address.split("."))


def dest_of(out, prefix6=None):
    """The backend address a forwarded frame was sent to, from its MAC (an
    IPv6 one within prefix6, its first twelve bytes)."""
    if out[1] == 0x06:
        return str(ipaddress.IPv6Address(ipaddress.IPv6Address(prefix6).packed[:12] + bytes(out[2:6])))
    return ".".join(str(b) for b in out[2:6])


@contextlib.contextmanager
def harness(root, **kw):
    h = Harness(root, **kw)
    try:
        yield h
    finally:
        h.close()


def rewrite_macs(frame, dst_mac, src_mac=BALANCER_MAC):
    raw = bytearray(bytes(frame))
    raw[0:6] = L.mac_bytes(dst_mac)
    raw[6:12] = L.mac_bytes(src_mac)
    return bytes(raw)


def dump_maps(root):
    """Every map's contents: compare before and after a refused change.
    Arrays are read whole in one batch (prefix_stats alone has a million
    slots); hash maps as sorted (key, value) pairs."""
    out = {}
    for name in L.MAPS:
        if name in ("counters",):
            continue
        with _bpf.Map(os.path.join(root, name)) as m:
            if m.type in _bpf.ARRAY_MAP_TYPES:
                out[name] = hashlib.sha256(b"".join(m.lookup_range(0, m.max_entries))).hexdigest()
            else:
                out[name] = sorted(m.lookup_batch()) if m.type != _bpf.MAP_DEVMAP else sorted(m.items())
    return out


def flows(dp):
    """Every flow record of both tables, as dicts."""
    out = []
    for name, (kt, vt, text) in (("flows", (L.FlowKey, L.FlowVal, L.ip_str)),
                                 ("flows6", (L.FlowKey6, L.FlowVal6, L.ip6_str))):
        for k, v in dp.maps[name].items():
            key, val = kt.from_buffer_copy(k), vt.from_buffer_copy(v)
            out.append({"client": text(key.saddr), "client_port": L.be16(key.sport),
                        "vip": text(key.daddr), "port": L.be16(key.dport),
                        "proto": key.proto, "service_index": val.svc_index,
                        "slot": val.dest_slot, "destination": text(val.dest_addr),
                        "last_seen_ns": val.last_seen})
    return out


def live_table(dp, index, gen):
    """The slots of one half of a service's Maglev table, as written."""
    got = []
    for blob in dp.maps["maglev"].lookup_range(dp.first_chunk(index, gen), dp.chunks):
        got.extend(L.MaglevChunk.from_buffer_copy(blob).slot)
    return got[:dp.maglev_table_size]
