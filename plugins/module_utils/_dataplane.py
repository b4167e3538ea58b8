# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Typed access to the pinned maps: services, destinations, flows, counters.

Writes follow one order so that a packet never sees a half-written table
or a slot pointing at the wrong backend (docs/design.md section 2.10):

1. destinations that are new, or whose forwarding data (MAC, interface,
   VLAN) changed, are written into free slots; live slots are only ever
   rewritten with identical forwarding bytes;
2. the Maglev table is written into the service's idle half;
3. the service entry (one hash element, replaced atomically by the kernel)
   switches to that half;
4. only then are the slots of removed destinations cleared.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import array
import collections
import ctypes
import functools
import heapq
import itertools
import ipaddress
import operator
import os
import struct
import sys
import time

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _layout as L, _maglev
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError


class DataPlaneError(XvsError):
    pass


class LimitError(DataPlaneError):
    pass


_PROTOCOL_NAMES = {v: k for k, v in L.PROTOCOLS.items()}
_DEST_FLAGS = L.Dest.flags.offset
# a forwarding parameter's kind -> its conversion to (and from) the struct
# field of its name in svc_val and dest: a port is in network order
_TO_STRUCT = {"port": L.be16}
_SVC_KEY6_SIZE = ctypes.sizeof(L.SvcKey6)


def _raw(struct_obj):
    return bytes(struct_obj)


def _u32(n):
    return bytes(L.U32(n))


def _fwd_bytes(d):
    """The bytes the data plane reads to forward: everything but weight."""
    return (d.addr, bytes(d.addr6), bytes(d.mac), bytes(d.src_mac), d.vlan, d.tx_port, d.ifindex,
            d.forwarding, d.tun_src, bytes(d.tun_src6), d.mtu) + tuple(getattr(d, p) for p in L.FORWARDING_PARAMS)


def forwarding_fields(fwd):
    """The struct fields a service's forwarding value sets, in svc_val and
    in each of its dest slots alike: the method's number and each method
    parameter's field (0 where the method has no such parameter; a missing
    value is the parameter's default)."""
    method = L.FORWARDING[fwd["method"]]
    out = {"forwarding": method.number}
    for param, owner in L.FORWARDING_PARAMS.items():
        default, kind = L.FORWARDING[owner].params[param]
        out[param] = _TO_STRUCT[kind](fwd.get(param, default)) if param in method.params else 0
    return out


def forwarding_value(struct):
    """A service's forwarding value from its svc_val (forwarding_fields
    the other way)."""
    method = L.FORWARDING_BY_NUMBER[struct.forwarding]
    out = {"method": method.name}
    for param, (dummy, kind) in method.params.items():
        out[param] = _TO_STRUCT[kind](getattr(struct, param))
    return out


def _is6(key):
    """Whether a service key (bytes) is an IPv6 one: the two key layouts
    differ in size, so the bytes say which map they belong to."""
    return len(key) == _SVC_KEY6_SIZE


def _services_map(key):
    return "services6" if _is6(key) else "services"


def _key_fields(key):
    """(address, port, protocol number) of a service key's bytes."""
    k = (L.SvcKey6 if _is6(key) else L.SvcKey).from_buffer_copy(key)
    return (L.ip6_str(k.vip) if _is6(key) else L.ip_str(k.vip)), L.be16(k.port), k.proto


def _batches(m):
    """m's (keys, values, n) batches, or its key walk as one batch where
    the kernel has no batch operations for it."""
    for batch in m.batches():
        if batch is None:
            pairs = m.items()
            yield b"".join(k for k, v in pairs), b"".join(v for k, v in pairs), len(pairs)
            return
        yield batch


def flow_owner(index, d):
    """What a flow record names of its destination, for flow_census()'s
    counts: the service slot, the destination slot and the address bytes
    (a record whose slot now holds another address is followed by no
    packet).  d: a dest_dict()."""
    raw = bytes(L.addr6(d["address"])) if ":" in d["address"] else struct.pack("=I", L.be32(d["address"]))
    return index, d["slot"], raw


def _owners(svc):
    """{slot: address} of a services() dict's destinations."""
    return dict((d["slot"], d["address"]) for d in svc["destinations"])


def dest_address(d):
    return L.ip6_str(d.addr6) if d.flags & L.DEST_V6 else L.ip_str(d.addr)


class DataPlane(object):
    """The maps pinned under one bpffs root, checked against _layout."""

    def __init__(self, root):
        self.root = root
        if not os.path.exists(os.path.join(root, "meta")):
            raise DataPlaneError("no xvs data plane is pinned under %s (is the program attached?)"
                                 % root)
        abi = pinned_abi(root)
        if abi != L.ABI_VERSION:      # before the maps: their layouts differ
            raise DataPlaneError(abi_refusal(root, abi))
        self.maps = {}
        try:
            for name, (mtype, key, value) in L.MAPS.items():
                m = _bpf.Map(os.path.join(root, name))
                self.maps[name] = m
                check_map(m, name, mtype, key, value)
            meta = L.Meta.from_buffer_copy(self.maps["meta"].lookup(_u32(0)))
        except Exception:
            self.close()
            raise
        self.meta = meta
        self.max_services = meta.max_services
        self.max_destinations = meta.max_destinations
        self.maglev_table_size = meta.maglev_table_size
        self.chunks = L.maglev_chunks(meta.maglev_table_size)

    def close(self):
        for m in self.maps.values():
            m.close()
        self.maps = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- reading ---------------------------------------------------------
    def _services_raw(self):
        """{key bytes: SvcVal} of both families' services maps."""
        return {k: L.SvcVal.from_buffer_copy(v) for name in ("services", "services6")
                for k, v in self.maps[name].lookup_batch()}

    def _dest_slots(self, index):
        """{slot: Dest} of the valid slots of service index."""
        raw = self.maps["dests"].lookup_range(index * self.max_destinations, self.max_destinations)
        # test the flags byte before building a struct: most slots are empty
        return {slot: L.Dest.from_buffer_copy(blob) for slot, blob in enumerate(raw)
                if blob[_DEST_FLAGS] & L.DEST_VALID}

    def _service_dict(self, k, v, slots=None):
        address, port, proto = _key_fields(k)
        slots = self._dest_slots(v.index) if slots is None else slots
        dests = sorted((dest_dict(d, slot) for slot, d in slots.items()),
                       key=lambda d: ipaddress.ip_address(d["address"]))
        return {"address": address, "port": port,
                "protocol": _PROTOCOL_NAMES.get(proto, str(proto)),
                "sticky": bool(v.flags & L.SVC_STICKY), "index": v.index, "gen": v.gen,
                "eligible": v.ndest, "forwarding": forwarding_value(v), "destinations": dests}

    def services(self):
        """Every service with its destinations, as plain dicts."""
        return [self._service_dict(k, v)
                for k, v in sorted(self._services_raw().items(), key=lambda kv: kv[1].index)]

    def service_dicts(self, current):
        """services() from what read_services() read, without reading again."""
        return [self._service_dict(k, v, slots)
                for k, (v, slots) in sorted(current.items(), key=lambda kv: kv[1][0].index)]

    def service(self, address, port, protocol):
        """One service as services() lists it, or None."""
        k = svc_key(address, port, protocol)
        v = self.maps[_services_map(k)].lookup(k)
        return self._service_dict(k, L.SvcVal.from_buffer_copy(v)) if v is not None else None

    def counters(self):
        m = self.maps["counters"]
        total = [0] * len(L.COUNTERS)
        for cpu in m.per_cpu(m.lookup(_u32(0))):
            for i, n in enumerate(L.Counters.from_buffer_copy(cpu).n):
                total[i] += n
        return dict(zip(L.COUNTERS, total))

    def _sum_stats(self, m, blob):
        total = {"packets": 0, "bytes": 0, "new_flows": 0}
        for cpu in m.per_cpu(blob):
            s = L.Stats.from_buffer_copy(cpu)
            for f in total:
                total[f] += getattr(s, f)
        return total

    def _stats(self, mapname, index):
        m = self.maps[mapname]
        return self._sum_stats(m, m.lookup(_u32(index)))

    def _stats_many(self, mapname, start, offsets):
        """{offset: _stats(start + offset)} for the offsets given, from one
        batch read of the range they span; only those are summed."""
        if not offsets:
            return {}
        m = self.maps[mapname]
        blobs = m.lookup_range(start, max(offsets) + 1)
        return dict((o, self._sum_stats(m, blobs[o])) for o in offsets)

    def service_stats(self, index):
        return self._stats("svc_stats", index)

    def dest_stats(self, index, slot):
        return self._stats("dest_stats", index * self.max_destinations + slot)

    def services_stats(self, indexes):
        """{index: service_stats(index)} in one batch read."""
        return self._stats_many("svc_stats", 0, indexes)

    def dests_stats(self, index, slots):
        """{slot: dest_stats(index, slot)} in one batch read."""
        return self._stats_many("dest_stats", index * self.max_destinations, slots)

    def busiest_prefixes(self, n):
        """The n client source prefixes (IPv4 /20s, IPv6 /48s) that sent
        the most forwarded VIP packets: [{'prefix': 'a.b.c.0/20',
        'packets': count}], busiest first.  One batch read of each whole
        per-CPU array: the IPv4 one (8 bytes per /20 per CPU) summed over
        CPUs with array slices, not per entry; the IPv6 one's (/48,
        packets) slots (16 bytes per slot per CPU) summed by /48."""
        if n <= 0:
            return []
        m = self.maps["prefix_stats"]
        per_cpu = array.array("Q", m.read_range(0, m.max_entries))
        cpus = len(per_cpu) // m.max_entries
        totals = per_cpu[0::cpus]
        for cpu in range(1, cpus):
            totals = array.array("Q", map(operator.add, totals, per_cpu[cpu::cpus]))
        busy = [("%s/%d" % (ipaddress.IPv4Address(i << (32 - L.SRC_PREFIX_LEN)), L.SRC_PREFIX_LEN), totals[i])
                for i in heapq.nlargest(n, (i for i, c in enumerate(totals) if c), key=totals.__getitem__)]
        m6 = self.maps["prefix_stats6"]
        words = array.array("Q", m6.read_range(0, m6.max_entries))   # (prefix, packets) pairs
        prefixes, counts = words[0::2], words[1::2]
        by_prefix = collections.Counter()
        # the used slots only, picked out in C (compress, filter): most are empty
        for prefix, packets in zip(itertools.compress(prefixes, counts), filter(None, counts)):
            by_prefix[prefix] += packets
        for prefix, packets in by_prefix.items():
            net = ipaddress.IPv6Address(prefix.to_bytes(8, sys.byteorder)[:L.SRC_PREFIX6_LEN // 8].ljust(16, b"\0"))
            busy.append(("%s/%d" % (net, L.SRC_PREFIX6_LEN), packets))
        return [{"prefix": p, "packets": c} for p, c in heapq.nlargest(n, busy, key=lambda b: b[1])]

    def flow_census(self, now=None):
        """One read of both flow tables: {"entries": {4: records, 6:
        records}, "active": {flow_owner(): unexpired records}}, a record
        being unexpired while its protocol's idle timeout has not passed
        since it was last refreshed (the program refreshes it once a second
        at most, on the CLOCK_MONOTONIC now compares with).  The tables are
        read in batches and their columns sliced in C: a full default table
        (1,048,576 IPv4 records) costs what bench/run control reports."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now is None else now
        tcp, udp = self.meta.tcp_timeout * 10 ** 9, self.meta.udp_timeout * 10 ** 9
        entries, active = {}, collections.Counter()
        for family, name, key, value_format in ((4, "flows", L.FlowKey, "=QHH4s"),
                                                (6, "flows6", L.FlowKey6, "=QHH4x16s")):
            m = self.maps[name]
            entries[family] = 0
            for keys, values, n in _batches(m):
                entries[family] += n
                protos = keys[key.proto.offset::m.key_size]
                active.update((index, slot, addr) for proto, (last, index, slot, addr)
                              in zip(protos, struct.iter_unpack(value_format, values))
                              if now - last <= (tcp if proto == L.PROTOCOLS["tcp"] else udp))
        return {"entries": entries, "active": active}

    def flow_records(self, service=None, limit=100):
        """Up to limit live flow records (of service, an (address, port,
        protocol), or all), as {client, client_port, vip, port, protocol,
        destination, idle_s}, most recently refreshed first."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out = []
        for name, (kt, vt, text) in (("flows", (L.FlowKey, L.FlowVal, L.ip_str)),
                                     ("flows6", (L.FlowKey6, L.FlowVal6, L.ip6_str))):
            for k, v in self.maps[name].lookup_batch():
                key, val = kt.from_buffer_copy(k), vt.from_buffer_copy(v)
                rec = {"client": text(key.saddr), "client_port": L.be16(key.sport), "vip": text(key.daddr),
                       "port": L.be16(key.dport), "protocol": _PROTOCOL_NAMES.get(key.proto, str(key.proto)),
                       "destination": text(val.dest_addr), "idle_s": max(0, (now - val.last_seen) // 10 ** 9)}
                if service is None or (rec["vip"], rec["port"], rec["protocol"]) == tuple(service):
                    out.append(rec)
        return sorted(out, key=lambda r: r["idle_s"])[:limit]

    def flow_table(self, census=None):
        """Capacity, records and evictions of the flow tables, together
        and per family ("families": {"ipv4": {capacity, entries}, "ipv6": ...}).

        The kernel evicts from the LRU without telling the program, so
        evictions are derived: every record the program created
        (new_flows - flow_reselect, the latter counting records it
        replaced) is either still there or was evicted.  Nothing else
        deletes flow records; a resize starts flows and counters afresh.
        """
        census = census or self.flow_census()
        families = dict(("ipv%d" % f, {"capacity": self.maps[name].max_entries, "entries": census["entries"][f]})
                        for f, name in ((4, "flows"), (6, "flows6")))
        entries = sum(census["entries"].values())
        c = self.counters()
        return {"capacity": sum(t["capacity"] for t in families.values()), "entries": entries,
                "evicted": max(0, c["new_flows"] - c["flow_reselect"] - entries), "families": families}

    def tx_port(self, ifindex):
        """The devmap slot that redirects to ifindex, or None."""
        m = self.maps["tx_ports"]
        for k, v in m.items():
            if int.from_bytes(v[:4], "little") == ifindex:
                return int.from_bytes(k, "little")
        return None

    def read_vlans(self):
        """{vlan id: 'net/len'} of a trunk, as pinned."""
        out = {}
        for k, v in self.maps["vlans"].lookup_batch():
            val = L.VlanNet.from_buffer_copy(v)
            if val.prefixlen:
                out[int.from_bytes(k, "little")] = "%s/%d" % (L.ip_str(val.net), val.prefixlen)
        return out

    def read_tunnel_source(self):
        """{'ipv4': address, 'ipv6': address} as pinned (families not set left out)."""
        val = L.TunnelSrc.from_buffer_copy(self.maps["tunnel_src"].lookup(_u32(0)))
        out = {"ipv4": L.ip_str(val.ipv4)} if val.ipv4 else {}
        if any(val.ipv6):
            out["ipv6"] = str(ipaddress.IPv6Address(bytes(val.ipv6)))
        return out

    # ---- writing ---------------------------------------------------------
    def write_vlans(self, vlans):
        """Make the vlans map hold exactly vlans ({id: prefix}, checked by
        _spec.vlans); True if it changed."""
        have = self.read_vlans()
        if vlans == have:
            return False
        for vid in set(have) | set(vlans):
            val = L.VlanNet()
            if vid in vlans:
                net = ipaddress.IPv4Network(vlans[vid])
                val = L.VlanNet(net=L.be32(str(net.network_address)), prefixlen=net.prefixlen)
            self.maps["vlans"].update(_u32(vid), _raw(val))
        return True

    def write_tunnel_source(self, tunnel_source):
        """Make the pinned tunnel source tunnel_source (checked by
        _spec.tunnel_source); True if it changed."""
        if tunnel_source == self.read_tunnel_source():
            return False
        val = L.TunnelSrc(ipv4=L.be32(tunnel_source["ipv4"]) if "ipv4" in tunnel_source else 0)
        if "ipv6" in tunnel_source:
            val.ipv6[:] = ipaddress.IPv6Address(tunnel_source["ipv6"]).packed
        self.maps["tunnel_src"].update(_u32(0), _raw(val))
        return True

    def read_services(self):
        """{service key bytes: (SvcVal, {slot: Dest})}: every service with
        its live destination slots, the one read a plan starts from."""
        return {k: (v, self._dest_slots(v.index)) for k, v in self._services_raw().items()}

    def plan_write(self, service, svc, destinations, current, taken):
        """What writing one service takes, checked against the limits before
        anything is written: a ServiceWrite, or None when the maps already
        hold exactly this (no Maglev table is built to find that out: equal
        destinations, weights and forwarding bytes mean the table written
        with them is still the right one).

        service: its (address, port, protocol); svc: a dict with its sticky
        and forwarding values (a desired service, see _planner);
        destinations: dicts with address, weight, mac, src_mac, vlan,
        ifindex, tx_port and for a tunnel tun_src and mtu (already
        resolved; mac is then the next hop's); current: read_services();
        taken: service indexes already given out in this plan (updated).
        """
        label = "service %s:%d/%s" % service
        if len(destinations) > self.max_destinations:
            raise LimitError("%s: %d destinations exceed max_destinations=%d"
                             % (label, len(destinations), self.max_destinations))
        key = svc_key(*service)
        addrs = [d["address"] for d in destinations]
        dup = sorted(set(a for a in addrs if addrs.count(a) > 1))
        if dup:
            raise DataPlaneError("%s: destination %s listed more than once" % (label, ", ".join(dup)))
        old, live = current.get(key, (None, {}))
        if old is None:
            index = next((i for i in range(self.max_services) if i not in taken), None)
            if index is None:
                raise LimitError("%s: all max_services=%d service slots are in use"
                                 % (label, self.max_services))
            gen = 1
        else:
            index, gen = old.index, old.gen
        taken.add(index)
        fwd = forwarding_fields(svc["forwarding"])
        wanted = {d["address"]: make_dest(d, fwd) for d in destinations}
        by_addr = {dest_address(d): (slot, d) for slot, d in live.items()}
        plan, new_slots = {}, []
        free_slots = [s for s in range(self.max_destinations) if s not in live]
        for addr, d in sorted(wanted.items()):
            cur = by_addr.get(addr)
            if cur and _fwd_bytes(cur[1]) == _fwd_bytes(d):
                plan[addr] = cur[0]
            else:
                if not free_slots:
                    raise LimitError("%s: too many destination changes at once for "
                                     "max_destinations=%d; apply them in two steps"
                                     % (label, self.max_destinations))
                plan[addr] = free_slots.pop(0)
                new_slots.append(plan[addr])
        flags = L.SVC_STICKY if svc["sticky"] else 0
        removed = [s for s in live if s not in plan.values()]
        if (old is not None and old.flags == flags and not new_slots and not removed
                and all(getattr(old, f) == v for f, v in fwd.items())
                and all(bytes(live[plan[a]]) == bytes(d) for a, d in wanted.items())):
            return None
        return ServiceWrite(tuple(service), key, index, gen, old is None, flags, wanted, plan, new_slots,
                            removed, fwd)

    def write(self, sw, tables=None):
        """Write one planned service in the order that keeps every packet on
        a whole table (see the module docstring).  tables: a dict shared by
        the writes of one run, so services with the same eligible
        destinations and weights build their Maglev table once."""
        tables = {} if tables is None else tables
        base = sw.index * self.max_destinations
        dests = self.maps["dests"]
        stats = self.maps["dest_stats"]
        zero_stats = stats.pack_all_cpus(bytes(L.Stats()))
        for addr, d in sw.wanted.items():
            slot = sw.plan[addr]
            if slot in sw.new_slots:
                stats.update(_u32(base + slot), zero_stats)
            dests.update(_u32(base + slot), _raw(d))
        if sw.new:
            self.maps["svc_stats"].update(_u32(sw.index), self.maps["svc_stats"].pack_all_cpus(
                bytes(L.Stats())))
        weights, (names, table) = self.table_for(sw, tables)
        new_gen = sw.gen ^ 1
        self._write_table(sw.index, new_gen, names, table, sw.plan)
        val = L.SvcVal(index=sw.index, flags=sw.flags, gen=new_gen, ndest=len(weights) if names else 0,
                       **sw.forwarding)
        self.maps[_services_map(sw.key)].update(sw.key, _raw(val))
        for slot in sw.removed:
            dests.update(_u32(base + slot), _raw(L.Dest()))

    def table_for(self, sw, tables):
        """(eligible (address, weight) pairs, (names, table)) of a planned
        service's new Maglev table, built once per distinct eligible set in
        tables (a dict a run shares)."""
        weights = tuple(sorted((a, d.weight) for a, d in sw.wanted.items() if d.weight > 0))
        if weights not in tables:
            tables[weights] = _maglev.build_indexes(weights, self.maglev_table_size)
        return weights, tables[weights]

    def moved(self, sw, current, tables):
        """The share of a planned service's table whose destination the
        write changes (_maglev.moved): 1.0 for a new service."""
        names, table = self.table_for(sw, tables)[1]
        new = None if names is None else [names[i] for i in table]
        if sw.new:
            return 1.0
        old, live = current[sw.key]
        owner = dict((slot, dest_address(d)) for slot, d in live.items())
        return _maglev.moved(self._positions(old.index, old.gen, old.ndest, owner), new)

    def remove(self, key, current):
        """Delete one service (key bytes) read by read_services()."""
        old, live = current[key]
        self.maps[_services_map(key)].delete(key)
        dests = self.maps["dests"]
        for slot in live:
            dests.update(_u32(old.index * self.max_destinations + slot), _raw(L.Dest()))

    def set_service(self, address, port, protocol, sticky, destinations, forwarding=None):
        """Make one service exist with exactly these destinations (see
        plan_write; forwarding: a forwarding value, default l2).  Returns
        True when anything was written."""
        current = self.read_services()
        sw = self.plan_write((address, port, protocol), {"sticky": sticky, "forwarding": forwarding or {
            "method": "l2"}}, destinations, current, set(v.index for v, dummy in current.values()))
        if sw is None:
            return False
        self.write(sw)
        self.sync_vips()
        return True

    def delete_service(self, address, port, protocol):
        key = svc_key(address, port, protocol)
        current = self.read_services()
        if key not in current:
            return False
        self.remove(key, current)
        self.sync_vips()
        return True

    def _table_bytes(self, names, table, plan):
        """One Maglev half as the chunks hold it: each slot the uint16
        destination slot that owns it, zero-padded to whole chunks.

        Up to 256 eligible destinations (the common case) the owner indexes
        fit in bytes, and bytes.translate maps them to the low and high
        bytes of their slots in C: a 65,537-slot half costs well under a
        millisecond instead of a Python loop over every slot."""
        total = self.chunks * L.MAGLEV_CHUNK
        if names is None:
            return bytes(2 * total)
        slots = [plan[a] for a in names]
        if len(names) > 256:
            out = array.array("H", [slots[i] for i in table])
            out.extend([0] * (total - len(table)))
            return out.tobytes()
        owners = bytes(table)
        lo = owners.translate(bytes(bytearray(s & 0xff for s in slots).ljust(256, b"\0")))
        hi = owners.translate(bytes(bytearray(s >> 8 for s in slots).ljust(256, b"\0")))
        if sys.byteorder == "big":
            lo, hi = hi, lo
        out = bytearray(2 * total)
        out[0:2 * len(table):2] = lo
        out[1:2 * len(table):2] = hi
        return bytes(out)

    def positions(self, svc):
        """A service's live Maglev table (svc: a services() dict) as the
        address each position sends a new flow to, or None when it has no
        eligible destination (the program drops its new flows)."""
        return self._positions(svc["index"], svc["gen"], svc["eligible"], _owners(svc))

    def digest(self, svc):
        """_maglev.digest() of a service's live table (svc: a services()
        dict), read from the maps without building its positions."""
        if not svc["eligible"]:
            return _maglev.digest(None)
        return _maglev.digest_slots(self._table_raw(svc["index"], svc["gen"]), _owners(svc))

    def _positions(self, index, gen, eligible, owner):
        if not eligible:
            return None
        return [owner.get(slot) for slot in array.array("H", self._table_raw(index, gen))]

    def _table_raw(self, index, gen):
        """A table half as the maps hold it: one native 16-bit slot number
        per position."""
        return self.maps["maglev"].read_range(self.first_chunk(index, gen), self.chunks)[:2 * self.maglev_table_size]

    def first_chunk(self, index, gen):
        """The maglev map's index of the first chunk of a service's half."""
        return (index * L.MAGLEV_HALVES + gen) * self.chunks

    def _write_table(self, index, gen, names, table, plan):
        first = self.first_chunk(index, gen)
        keys = array.array("I", range(first, first + self.chunks)).tobytes()
        self.maps["maglev"].update_batch(keys, self._table_bytes(names, table, plan))

    def sync_vips(self):
        """Rebuild the VIP set from the services: which VIPs exist, and the
        sticky service (lowest port) that owns each VIP's fragments; then
        the VIP filter from that set.  Callers write services first, so a
        new VIP's traffic passes until its filter bit is set here (as it
        did before its vips entry existed), and a gone VIP's bit is cleared
        only after its services were removed: the filter never hides a
        configured service."""
        want = {"vips": {}, "vips6": {}}    # map -> {VIP key bytes: VipVal}
        hashes = set()                        # what the filter hashes, per VIP
        for k, v in self._services_raw().items():
            address, port, proto = _key_fields(k)
            if _is6(k):
                name, vip_key, h = "vips6", bytes(L.addr6(address)), L.fold6(address)
            else:
                name, vip_key, h = "vips", _u32(L.be32(address)), L.be32(address)
            hashes.add(h)
            vv = want[name].setdefault(vip_key, L.VipVal())
            if v.flags & L.SVC_STICKY:
                field = "frag_port_tcp" if proto == L.PROTOCOLS["tcp"] else "frag_port_udp"
                cur = getattr(vv, field)
                if not cur or port < L.be16(cur):
                    setattr(vv, field, L.be16(port))
        for name, vips in want.items():
            m = self.maps[name]
            have = dict(m.items())
            for k, vv in vips.items():
                if have.get(k) != _raw(vv):
                    m.update(k, _raw(vv))
            for k in have:
                if k not in vips:
                    m.delete(k)
        self._sync_vip_filter(hashes)

    def _sync_vip_filter(self, vips):
        words = [0] * L.VIP_FILTER_WORDS
        for vip in vips:
            bit = L.vip_filter_bit(vip)
            words[bit // 64] |= 1 << (bit % 64)
        m = self.maps["vip_filter"]
        have = m.lookup_range(0, L.VIP_FILTER_WORDS)
        for i, w in enumerate(words):
            raw = w.to_bytes(8, "little")
            if have[i] != raw:
                m.update(_u32(i), raw)


class ServiceWrite(object):
    """One service's planned write: its (address, port, protocol) and key
    bytes, index and current table half, the destinations by address with
    the slot each goes to, the slots that are new and those to clear after
    the switch."""

    def __init__(self, service, key, index, gen, new, flags, wanted, plan, new_slots, removed, forwarding):
        self.service, self.key, self.index, self.gen, self.new, self.flags = service, key, index, gen, new, flags
        self.wanted, self.plan, self.new_slots, self.removed = wanted, plan, new_slots, removed
        self.forwarding = forwarding     # forwarding_fields()


def pinned_abi(root):
    """The ABI version in the pinned meta map (its layout never changes),
    or None where nothing is pinned."""
    path = os.path.join(root, "meta")
    if not os.path.exists(path):
        return None
    with _bpf.Map(path) as m:
        return int.from_bytes(m.lookup(_u32(0))[:4], sys.byteorder)


def abi_refusal(root, abi):
    """Why maps pinned by another data-plane ABI are not used, and the way on."""
    return ("%s holds maps of data-plane ABI %d and this version of xvs.lb needs ABI %d: the map "
            "layouts differ, so they cannot be reused. Remove them (rm -r %s; live flows and "
            "counters are lost) and attach again, then let the boot restore or the role put the "
            "services back from the state of record; a reboot does the same"
            % (root, abi, L.ABI_VERSION, root))


def check_map(m, name, mtype, key, value):
    """Refuse a pinned map whose shape differs from _layout: reusing it
    would silently corrupt it."""
    want = (mtype, ctypes.sizeof(key), ctypes.sizeof(value))
    got = (m.type, m.key_size, m.value_size)
    if want != got:
        raise DataPlaneError(
            "pinned map %s has type/key/value sizes %s, this version expects %s: it was pinned "
            "by an incompatible program version" % (m.path, got, want))


def svc_key(address, port, protocol):
    """A service's key bytes: an SvcKey, or an SvcKey6 for an IPv6 VIP."""
    if protocol not in L.PROTOCOLS:
        raise DataPlaneError("protocol %r: must be one of %s" % (protocol, ", ".join(L.PROTOCOLS)))
    if ":" in address:
        return _raw(L.SvcKey6(vip=L.addr6(address), port=L.be16(port), proto=L.PROTOCOLS[protocol]))
    return _raw(L.SvcKey(vip=L.be32(address), port=L.be16(port), proto=L.PROTOCOLS[protocol]))


def make_dest(d, forwarding=None):
    """The Dest for a resolved destination dict, of a service whose
    forwarding_fields() are forwarding (default: l2); failing=True marks
    one health masks (written with weight 0).  Read-only and cached: a
    thousand services over one pool compare the same few hundred."""
    failing = bool(d.get("failing"))
    fields = tuple(sorted((forwarding or forwarding_fields({"method": "l2"})).items()))
    return _dest(d["address"], 0 if failing else d["weight"], d["mac"], d["src_mac"], d.get("vlan", 0),
                 d.get("tx_port", 0), d["ifindex"], fields, d.get("tun_src"), d.get("mtu", 0), failing)


@functools.lru_cache(maxsize=8192)
def _dest(address, weight, mac, src_mac, vlan, tx_port, ifindex, forwarding, tun_src, mtu, failing):
    flags = L.DEST_VALID | (L.DEST_FAILING if failing else 0)
    out = L.Dest(flags=flags, vlan=vlan, tx_port=tx_port, ifindex=ifindex, weight=weight, mtu=mtu,
                 **dict(forwarding))
    if ":" in address:
        out.flags |= L.DEST_V6
        out.addr6 = L.addr6(address)
        if tun_src:
            out.tun_src6 = L.addr6(tun_src)
    else:
        out.addr = L.be32(address)
        out.tun_src = L.be32(tun_src) if tun_src else 0
    out.mac[:] = L.mac_bytes(mac)
    out.src_mac[:] = L.mac_bytes(src_mac)
    return out


def dest_state(d):
    """What the maps say of a destination (docs/design.md section 2.5):
    failing (masked by health), drained (weight 0) or up."""
    if d.flags & L.DEST_FAILING:
        return "failing"
    return "up" if d.weight else "drained"


def dest_dict(d, slot):
    """A Dest as a plain dict; tun_src and mtu only for a tunnel."""
    out = {"address": dest_address(d), "weight": d.weight, "mac": L.mac_str(d.mac),
           "src_mac": L.mac_str(d.src_mac), "vlan": d.vlan, "ifindex": d.ifindex,
           "tx_port": d.tx_port, "slot": slot, "state": dest_state(d),
           "failing": bool(d.flags & L.DEST_FAILING)}
    if L.FORWARDING_BY_NUMBER[d.forwarding].tunnel:
        out.update(tun_src=L.ip6_str(d.tun_src6) if d.flags & L.DEST_V6 else L.ip_str(d.tun_src), mtu=d.mtu)
    return out
