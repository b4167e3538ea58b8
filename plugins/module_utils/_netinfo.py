# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the kernel knows about interfaces, over netlink with pyroute2:
indexes and MACs, XDP attachment state, on-link lookup of destinations
(directly or through a VLAN of a trunk) and neighbour (ARP) resolution.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import socket
import time

from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    HAS_PYROUTE2 = True
except ImportError:  # reported by the modules with missing_required_lib
    HAS_PYROUTE2 = False

# IFLA_XDP_ATTACHED (include/uapi/linux/if_link.h), as numbers and as the
# names pyroute2 decodes them to
XDP_MODES = {1: "native", 2: "generic", 3: "offload",
             "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}
# NUD states that carry a usable link-layer address
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


class NetInfoError(XvsError, ValueError):
    pass


def interface(name):
    """{'name', 'index', 'mac', 'mtu', 'networks': [IPv4Network or IPv6Network], 'xdp_mode',
    'xdp_prog_id'}."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise NetInfoError("interface %s does not exist" % name)
        link = ipr.get_links(idx[0])[0]
        nets = [ipaddress.ip_interface("%s/%d" % (a.get_attr("IFA_ADDRESS"), a["prefixlen"])).network
                for family in (socket.AF_INET, socket.AF_INET6)
                for a in ipr.get_addr(index=idx[0], family=family)]
    mode, prog_id = _xdp(link)
    return {"name": name, "index": idx[0], "mac": link.get_attr("IFLA_ADDRESS"),
            "mtu": link.get_attr("IFLA_MTU"), "networks": nets, "xdp_mode": mode,
            "xdp_prog_id": prog_id}


def _xdp(link):
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None, 0
    return (XDP_MODES.get(xdp.get_attr("IFLA_XDP_ATTACHED") or 0),
            xdp.get_attr("IFLA_XDP_PROG_ID") or 0)


def xdp_interfaces(prog_id):
    """{ifname: mode} of every interface in this namespace running prog_id."""
    out = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            mode, pid = _xdp(link)
            if pid == prog_id and mode:
                out[link.get_attr("IFLA_IFNAME")] = mode
    return out


def locate(address, interfaces, vlans=None, infos=None):
    """Where a destination is on-link for L2 DSR.

    interfaces: the attached interface names; vlans: {vlan id: prefix} of
    an 802.1Q trunk (the first interface); infos: interface() of each, when
    the caller has read them already.  Returns (interface dict, vlan id);
    raises NetInfoError when no attached interface or VLAN holds it.
    """
    addr = ipaddress.ip_address(address)
    infos = infos or [interface(n) for n in interfaces]
    for vid, prefix in sorted((vlans or {}).items()):
        if addr.version == 4 and addr in ipaddress.IPv4Network(prefix, strict=False) and infos:
            return infos[0], int(vid)
    for info in infos:
        if any(addr.version == net.version and addr in net and not net.is_link_local
               for net in info["networks"]):
            return info, 0
    raise NetInfoError("destination %s is not on-link through any attached interface (%s)"
                       % (address, ", ".join(interfaces) or "none attached"))


def route(address):
    """How the kernel routes to address: {'gateway' (None when on-link),
    'prefsrc', 'mtu' (the route's MTU metric, or None)}."""
    with IPRoute() as ipr:
        try:
            r = ipr.route("get", dst=address, family=socket.AF_INET6 if ":" in address else socket.AF_INET)[0]
        except NetlinkError as e:
            raise NetInfoError("no route to %s (%s)" % (address, e.args[-1] if e.args else e))
    if r["type"] != 1:      # RTN_UNICAST: not local, blackhole, unreachable ...
        raise NetInfoError("%s is not routed to another host (route type %d)" % (address, r["type"]))
    metrics = r.get_attr("RTA_METRICS")
    return {"gateway": r.get_attr("RTA_GATEWAY"), "prefsrc": r.get_attr("RTA_PREFSRC"),
            "mtu": metrics.get_attr("RTAX_MTU") if metrics else None}


def neighbours(index, ipr=None):
    """{address: MAC} of the usable neighbour entries (ARP and NDP) on one
    interface: one netlink dump per family, so a run resolving many
    destinations reads them once."""
    if ipr is None:
        with IPRoute() as own:
            return neighbours(index, own)
    out = {}
    for n in [n for family in (socket.AF_INET, socket.AF_INET6)
              for n in ipr.get_neighbours(family=family, ifindex=index)]:
        mac = n.get_attr("NDA_LLADDR")
        if n["state"] & _NUD_USABLE and mac and mac != "00:00:00:00:00:00":
            out[n.get_attr("NDA_DST")] = mac
    return out


def probe(address, ifname):
    """Make the kernel resolve the address: one datagram to the discard
    port through the interface starts ARP (or neighbour discovery), as any
    first packet would.  Returns at once; the answer lands in the
    neighbour table."""
    s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        s.sendto(b"", (address, 9))
    except OSError:
        pass
    finally:
        s.close()


RESOLVE_TIMEOUT = 3.0     # s a run waits, once, for the neighbours it probed
POLL = 0.05               # s between looks at the neighbour tables while waiting


def unresolved(address, ifname, timeout):
    """The error of a MAC that did not resolve."""
    return NetInfoError("cannot resolve the MAC address of %s on %s (no %s reply within %gs)"
                        % (address, ifname, "neighbour discovery" if ":" in address else "ARP", timeout))


def resolve_all(missing, timeout=RESOLVE_TIMEOUT, alive=None):
    """Resolve many neighbours at once: missing is {(ifindex, ifname):
    set of addresses}; each is probed once, then the neighbour tables are
    read until every one answered or timeout passed (alive(), if given, is
    called while waiting).  Returns {ifindex: neighbours()} as last read:
    a hundred dead destinations cost one timeout, not a hundred."""
    with IPRoute() as ipr:
        found = dict((index, neighbours(index, ipr)) for index, dummy in missing)
        for (index, name), addresses in missing.items():
            for address in addresses - set(found[index]):
                probe(address, name)
        deadline = time.monotonic() + timeout
        while any(addresses - set(found[index]) for (index, dummy), addresses in missing.items()) \
                and time.monotonic() < deadline:
            if alive:
                alive()
            time.sleep(POLL)
            found = dict((index, neighbours(index, ipr)) for index, dummy in missing)
    return found


def resolve_mac(address, info, timeout=RESOLVE_TIMEOUT, known=None):
    """The destination's MAC from the neighbour table (known: neighbours()
    of the interface, read already), probing once if it is missing;
    NetInfoError when it cannot be resolved within timeout."""
    if known is not None and address in known:
        return known[address]
    mac = resolve_all({(info["index"], info["name"]): {address}}, timeout)[info["index"]].get(address)
    if not mac:
        raise unresolved(address, info["name"], timeout)
    return mac
