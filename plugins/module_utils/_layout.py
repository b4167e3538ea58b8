# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one Python description of the data plane's maps, sizes and counters.

files/xdp_lb.c declares the same structs; the loader checks every pinned
map's type, key size and value size against MAPS below before reusing it,
and tests/unit/test_layout.py compares the counter names with the C enum.
Change both together and bump ABI_VERSION.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import ipaddress
import socket
import sys

from ansible_collections.xvs.lb.plugins.module_utils import _bpf
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

ABI_VERSION = 3
# the collection's release, galaxy.yml's version (tests/unit/test_layout.py
# ties the two): xvs_build_info and `xvs --version` name it
VERSION = "0.3.0"
MAGLEV_CHUNK = 16          # Maglev slots per array element
MAGLEV_HALVES = 2          # each service's live and idle table (design.md §2.10)
SRC_PREFIX_LEN = 20        # source prefix counters count per /20
PREFIX_SLOTS = 1 << SRC_PREFIX_LEN
SRC_PREFIX6_LEN = 48       # and IPv6 clients per /48, in slots of
PREFIX6_ORDER = 16         # (/48, packets) each: a /48 hashes to slot
PREFIX6_SLOTS = 1 << PREFIX6_ORDER
PREFIX6_MULT = 0x9E3779B97F4A7C15  # (its 6 bytes as a u64 * MULT mod 2**64) >> (64 - ORDER)
# The VIP filter: a bitmap of 2**VIP_FILTER_ORDER bits in u64 words, bit
# (vip * VIP_FILTER_MULT mod 2**32) >> (32 - VIP_FILTER_ORDER) set per VIP
VIP_FILTER_ORDER = 16
VIP_FILTER_MULT = 0x9E3779B1
VIP_FILTER_WORDS = (1 << VIP_FILTER_ORDER) // 64
VLAN_IDS = 4096            # 802.1Q ids, the index of the vlans map
SVC_STICKY = 1
DEST_VALID = 1
DEST_V6 = 2                # the destination's address is addr6
DEST_FAILING = 4           # masked by health: no packet follows a flow to it (weight 0 too)
# Header sizes, as the kernel's structs have them (struct iphdr without
# options, struct ipv6hdr, struct udphdr); tests/unit/test_layout.py
# compiles them against those structs.
IPV4_HEADER, IPV6_HEADER, UDP_HEADER = 20, 40, 8


class Method(object):
    """A forwarding method (docs/design.md section 2.13): its name, its
    number in struct svc_val and struct dest (FWD_* in xdp_lb.c), the bytes
    it puts in front of a client's packet per IP version, and its
    parameters as {option: (default, kind)}, which a service carries with
    the method and copies, as the method, into each destination slot.
    Adding a method is a row here and its encapsulation in xdp_lb.c."""

    def __init__(self, name, number, overhead, params=None):
        self.name, self.number, self.overhead = name, number, overhead
        self.params = params or {}
        self.tunnel = overhead[4] > 0


METHODS = (
    Method("l2", 0, {4: 0, 6: 0}),
    Method("ipip", 1, {4: IPV4_HEADER, 6: IPV6_HEADER}),
    # GUE variant 1; the port is the one the Linux fou/gue documentation uses
    Method("gue", 2, {4: IPV4_HEADER + UDP_HEADER, 6: IPV6_HEADER + UDP_HEADER},
           {"gue_port": (6080, "port")}),
)
FORWARDING = dict((m.name, m) for m in METHODS)
FORWARDING_BY_NUMBER = dict((m.number, m) for m in METHODS)
# every method's parameter options, for the argument specs
FORWARDING_PARAMS = dict((p, m.name) for m in METHODS for p in m.params)
IPV6_MIN_MTU = 1280        # the least a Packet Too Big may ask for
ICMP_QUOTE_LEN = 128       # bytes of a too-big frame its ICMP quotes
MAX_TUNNEL_MTU = 65535     # struct dest's mtu is a u16
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# Global counters, in the order of enum counter in xdp_lb.c.
COUNTERS = (
    "rx_packets", "rx_bytes", "pass", "tx", "redirect",
    "drop_no_service", "drop_no_dest", "drop_fragment", "drop_icmp", "drop_vlan",
    "icmp_echo_reply", "icmp_ptb_forwarded", "new_flows", "flow_reselect",
    "encap_ipip", "encap_gue", "icmp_too_big", "drop_encap", "drop_ipv6_ext",
)
# Where a frame ends: every frame counted in rx_packets lands in exactly one.
VERDICT_COUNTERS = ("pass", "tx", "redirect", "drop_no_service", "drop_no_dest",
                    "drop_fragment", "drop_icmp", "drop_vlan", "icmp_echo_reply", "icmp_too_big",
                    "drop_encap", "drop_ipv6_ext")


class SvcKey(ctypes.Structure):
    _fields_ = [("vip", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class SvcVal(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("gen", ctypes.c_uint32), ("ndest", ctypes.c_uint32),
                ("forwarding", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("gue_port", ctypes.c_uint16)]


class VipVal(ctypes.Structure):
    _fields_ = [("frag_port_tcp", ctypes.c_uint16), ("frag_port_udp", ctypes.c_uint16),
                ("pad", ctypes.c_uint32)]


class Addr6(ctypes.Structure):
    """An IPv6 address as four u32 words holding its bytes in network order."""
    _fields_ = [("w", ctypes.c_uint32 * 4)]


class Dest(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("mac", ctypes.c_uint8 * 6), ("src_mac", ctypes.c_uint8 * 6),
                ("vlan", ctypes.c_uint16), ("tx_port", ctypes.c_uint16),
                ("ifindex", ctypes.c_uint32), ("weight", ctypes.c_uint32),
                ("forwarding", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("gue_port", ctypes.c_uint16), ("tun_src", ctypes.c_uint32),
                ("mtu", ctypes.c_uint16), ("pad2", ctypes.c_uint16), ("addr6", Addr6),
                ("tun_src6", Addr6)]


class MaglevChunk(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint16 * MAGLEV_CHUNK)]


class FlowKey(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class FlowVal(ctypes.Structure):
    _fields_ = [("last_seen", ctypes.c_uint64), ("svc_index", ctypes.c_uint16),
                ("dest_slot", ctypes.c_uint16), ("dest_addr", ctypes.c_uint32)]


class SvcKey6(ctypes.Structure):
    _fields_ = [("vip", Addr6), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class FlowKey6(ctypes.Structure):
    _fields_ = [("saddr", Addr6), ("daddr", Addr6), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class FlowVal6(ctypes.Structure):
    _fields_ = [("last_seen", ctypes.c_uint64), ("svc_index", ctypes.c_uint16),
                ("dest_slot", ctypes.c_uint16), ("pad", ctypes.c_uint32), ("dest_addr", Addr6)]


class Counters(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint64 * len(COUNTERS))]


class Stats(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("new_flows", ctypes.c_uint64)]


class Meta(ctypes.Structure):
    # abi_version is the first word in every ABI: _dataplane.pinned_abi reads
    # only that; later fields are appended
    _fields_ = [("abi_version", ctypes.c_uint32), ("max_services", ctypes.c_uint32),
                ("max_destinations", ctypes.c_uint32), ("maglev_table_size", ctypes.c_uint32),
                ("flow_table_size", ctypes.c_uint32), ("tcp_timeout", ctypes.c_uint32),
                ("udp_timeout", ctypes.c_uint32), ("max_interfaces", ctypes.c_uint32),
                ("build_id", ctypes.c_uint32 * 4), ("flow_table_size_v6", ctypes.c_uint32)]


class VlanNet(ctypes.Structure):
    _fields_ = [("net", ctypes.c_uint32), ("prefixlen", ctypes.c_uint32)]


class Prefix6Count(ctypes.Structure):
    # prefix: the /48's six bytes in memory order, zero-padded
    _fields_ = [("prefix", ctypes.c_uint64), ("packets", ctypes.c_uint64)]


class TunnelSrc(ctypes.Structure):
    _fields_ = [("ipv4", ctypes.c_uint32), ("ipv6", ctypes.c_uint8 * 16)]


U32 = ctypes.c_uint32
U64 = ctypes.c_uint64

# Sizes fixed at attach time: name -> (default, minimum, maximum, -D macro).
SIZE_LIMITS = {
    "max_services": (64, 1, 65536, "MAX_SERVICES"),
    "max_destinations": (256, 1, 65535, "MAX_DESTINATIONS"),
    "maglev_table_size": (65537, 251, 1 << 22, "MAGLEV_TABLE_SIZE"),
    "flow_table_size": (1 << 20, 1024, 1 << 26, "FLOW_TABLE_SIZE"),
    "flow_table_size_v6": (1 << 18, 1024, 1 << 26, "FLOW_TABLE_SIZE_V6"),
    "tcp_timeout": (300, 1, 86400, "TCP_TIMEOUT"),
    "udp_timeout": (60, 1, 86400, "UDP_TIMEOUT"),
    "max_interfaces": (64, 1, 4096, "MAX_INTERFACES"),
}


class SizeError(XvsError, ValueError):
    pass


def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def sizes(**given):
    """Validated sizes: defaults filled in, every value an int in range.

    Being ints is what keeps them safe on the compiler's command line.
    """
    out = {}
    for name, (default, lo, hi, _macro) in SIZE_LIMITS.items():
        value = given.pop(name, None)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int):
            raise SizeError("%s=%r: must be an integer" % (name, value))
        if not lo <= value <= hi:
            raise SizeError("%s=%d: must be between %d and %d" % (name, value, lo, hi))
        out[name] = value
    if given:
        raise SizeError("unknown size option(s): %s" % ", ".join(sorted(given)))
    if not is_prime(out["maglev_table_size"]):
        raise SizeError("maglev_table_size=%d: must be a prime" % out["maglev_table_size"])
    if out["maglev_table_size"] <= out["max_destinations"]:
        raise SizeError("maglev_table_size=%d: must exceed max_destinations=%d"
                        % (out["maglev_table_size"], out["max_destinations"]))
    for name, entries in map_entries(out).items():
        if entries >= 1 << 32:
            raise SizeError("the %s map would need %d entries: lower the sizes" % (name, entries))
    return out


def maglev_chunks(maglev_table_size):
    return (maglev_table_size + MAGLEV_CHUNK - 1) // MAGLEV_CHUNK


def map_entries(s):
    """max_entries of every map for the given sizes."""
    per_dest = s["max_services"] * s["max_destinations"]
    return {
        "meta": 1, "vips": s["max_services"], "services": s["max_services"],
        "dests": per_dest,
        "maglev": s["max_services"] * MAGLEV_HALVES * maglev_chunks(s["maglev_table_size"]),
        "flows": s["flow_table_size"], "counters": 1, "vip_filter": VIP_FILTER_WORDS,
        "svc_stats": s["max_services"], "dest_stats": per_dest,
        "prefix_stats": PREFIX_SLOTS, "prefix_stats6": PREFIX6_SLOTS, "tx_ports": s["max_interfaces"],
        "vlans": VLAN_IDS,
        "tunnel_src": 1, "vips6": s["max_services"], "services6": s["max_services"],
        "flows6": s["flow_table_size_v6"],
    }


# Pinned maps: name -> (bpf map type, key struct, value struct).
MAPS = {
    "meta": (_bpf.MAP_ARRAY, U32, Meta),
    "vip_filter": (_bpf.MAP_ARRAY, U32, U64),
    "vips": (_bpf.MAP_HASH, U32, VipVal),
    "services": (_bpf.MAP_HASH, SvcKey, SvcVal),
    "dests": (_bpf.MAP_ARRAY, U32, Dest),
    "maglev": (_bpf.MAP_ARRAY, U32, MaglevChunk),
    "flows": (_bpf.MAP_LRU_HASH, FlowKey, FlowVal),
    "counters": (_bpf.MAP_PERCPU_ARRAY, U32, Counters),
    "svc_stats": (_bpf.MAP_PERCPU_ARRAY, U32, Stats),
    "dest_stats": (_bpf.MAP_PERCPU_ARRAY, U32, Stats),
    "prefix_stats": (_bpf.MAP_PERCPU_ARRAY, U32, U64),
    "prefix_stats6": (_bpf.MAP_PERCPU_ARRAY, U32, Prefix6Count),
    "tx_ports": (_bpf.MAP_DEVMAP, U32, U32),
    "vlans": (_bpf.MAP_ARRAY, U32, VlanNet),
    "tunnel_src": (_bpf.MAP_ARRAY, U32, TunnelSrc),
    "vips6": (_bpf.MAP_HASH, Addr6, VipVal),
    "services6": (_bpf.MAP_HASH, SvcKey6, SvcVal),
    "flows6": (_bpf.MAP_LRU_HASH, FlowKey6, FlowVal6),
}


def vip_filter_bit(vip):
    """The filter bit of a VIP given as be32() gives it (for IPv6, the XOR
    of its four words: fold6())."""
    return ((vip * VIP_FILTER_MULT) & 0xFFFFFFFF) >> (32 - VIP_FILTER_ORDER)


def prefix6_slot(address):
    """The prefix_stats6 slot of the /48 of an IPv6 address, as xdp_lb.c
    computes it."""
    prefix = int.from_bytes(ipaddress.IPv6Address(address).packed[:SRC_PREFIX6_LEN // 8].ljust(8, b"\0"),
                            sys.byteorder)
    return (prefix * PREFIX6_MULT) % 2 ** 64 >> (64 - PREFIX6_ORDER)


def addr6(address):
    """An IPv6 address as Addr6."""
    return Addr6.from_buffer_copy(ipaddress.IPv6Address(address).packed)


def fold6(address):
    """The u32 the program's VIP filter hashes for an IPv6 address."""
    w = addr6(address).w
    return w[0] ^ w[1] ^ w[2] ^ w[3]


def ip6_str(a):
    """An Addr6 as text."""
    return str(ipaddress.IPv6Address(bytes(a)))


def be32(address):
    """An IPv4 address as the u32 whose memory holds it in network order."""
    return int.from_bytes(ipaddress.IPv4Address(address).packed, sys.byteorder)


def ip_str(value):
    return str(ipaddress.IPv4Address(value.to_bytes(4, sys.byteorder)))


def be16(port):
    return socket.htons(port)


def mac_bytes(mac):
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError("%r is not a MAC address" % mac)
    return bytes(int(p, 16) for p in parts)


def mac_str(raw):
    return ":".join("%02x" % b for b in bytes(raw))
