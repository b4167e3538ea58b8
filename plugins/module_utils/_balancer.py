# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The balancer as the control plane sees it: the pinned program's status
and maps under one pin root, where a destination is reached (interface,
VLAN, MACs), and the read-only report xvs_info returns."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L, _loader, _netinfo
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, flow_owner
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError
from ansible_collections.xvs.lb.plugins.module_utils._spec import bpffs, forwarding_config


class Balancer(object):
    """The pinned program's state and maps under one bpffs root."""

    def __init__(self, root, wait=_netinfo.RESOLVE_TIMEOUT, alive=None):
        """wait: seconds a run waits, once, for the neighbours it probed
        (0: probe and take what answered already, as xvs-agent does);
        alive(): called while waiting (the agent's watchdog)."""
        self.wait, self.alive = wait, alive
        self.root = bpffs(root)
        self.status = _loader.status(self.root)
        if self.status is None:
            raise XvsError("bpffs=%s: the xvs program is not attached here (no pins); "
                           "run xvs.lb.xvs_attach first" % self.root)
        self.dp = DataPlane(self.root)
        self._ifnames = None
        self._resolved = {}
        self._infos = None        # the attached interfaces, read once a run
        self._neighbours = {}     # ifindex -> neighbours(), read once a run
        self._probed = set()      # addresses probed and waited for in this run
        self._routes = {}         # address -> _netinfo.route(), read once a run

    def close(self):
        self.dp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def ifname(self, index):
        if self._ifnames is None:
            self._ifnames = dict((_netinfo.interface(n)["index"], n) for n in self.status["interfaces"])
        return self._ifnames.get(index)

    def resolve(self, option, address, mac_override=None, tunnel=False):
        """A destination's forwarding data: interface, VLAN, MACs, and for
        a tunnel (tunnel=True) its source address and the egress MTU.
        Cached for the run: a thousand services over one pool resolve it
        once."""
        key = (address, mac_override, tunnel)
        if key not in self._resolved:
            self._resolved[key] = (self._resolve_tunnel if tunnel else self._resolve)(
                option, address, mac_override)
        return dict(self._resolved[key])

    def _resolve_tunnel(self, option, address, mac_override):
        """A tunnel's forwarding data (docs/design.md §2.13): the next hop is
        the kernel's route to the destination (its gateway, or the
        destination itself when on-link), reached as an L2 destination is
        (mac: the next hop's MAC); the outer source is xvs_attach's
        tunnel_source, else the route's preferred source, the balancer's
        address on that interface."""
        route = self._route(option, address)
        hop = route["gateway"] or address
        try:
            out = self._resolve("its next hop", hop, mac_override)
        except XvsError as e:
            raise XvsError("%s=%s: %s" % (option, address, e))
        out.update(self.tunnel(option, address, out["ifindex"]), address=address)
        return out

    def tunnel(self, option, address, ifindex):
        """What a tunnel to address through ifindex takes now: {tun_src:
        xvs_attach's tunnel_source, else the source of the route to it;
        mtu: the route's MTU metric, else the interface's}."""
        route = self._route(option, address)
        v6 = ":" in address
        source = self.status["tunnel_source"].get("ipv6" if v6 else "ipv4") or route["prefsrc"]
        if not source:
            raise XvsError("%s=%s: the route to it has no source address for the tunnel; set "
                           "xvs_attach's tunnel_source" % (option, address))
        mtu = min(route["mtu"] or self._info(ifindex)["mtu"], L.MAX_TUNNEL_MTU)
        # the MTU left inside must be one the ICMP error can quote (IPv4) or a
        # Packet Too Big may ask for (IPv6)
        inside = mtu - max(m.overhead[6 if v6 else 4] for m in L.METHODS)
        if inside < (L.IPV6_MIN_MTU if v6 else L.ICMP_QUOTE_LEN):
            raise XvsError("%s=%s: the egress MTU %d is too small to tunnel through"
                           % (option, address, mtu))
        return {"tun_src": source, "mtu": mtu}

    def _route(self, option, address):
        if address not in self._routes:
            try:
                self._routes[address] = _netinfo.route(address)
            except _netinfo.NetInfoError as e:
                raise XvsError("%s=%s: %s" % (option, address, e))
        return self._routes[address]

    def _attached(self):
        """interface() of each attached interface, in name order, read once a run."""
        if self._infos is None:
            self._infos = [_netinfo.interface(n) for n in sorted(self.status["interfaces"])]
        return self._infos

    def _info(self, index):
        return next(i for i in self._attached() if i["index"] == index)

    def _locate(self, option, address):
        """(interface(), VLAN id) through which address is on-link."""
        interfaces = sorted(self.status["interfaces"])
        if not interfaces:
            raise XvsError("bpffs=%s: the program is not attached to any interface" % self.root)
        try:
            return _netinfo.locate(address, interfaces, self.status["vlans"], self._attached())
        except _netinfo.NetInfoError as e:
            raise XvsError("%s=%s: %s" % (option, address, e))

    def _known(self, index):
        """The neighbour table of one interface, read once a run (and again
        after a wait)."""
        if index not in self._neighbours:
            self._neighbours[index] = _netinfo.neighbours(index)
        return self._neighbours[index]

    def prepare(self, requests):
        """Resolve together every destination of requests ((option,
        address, mac override, tunnel) each) whose MAC, or whose tunnel's
        next hop's, the neighbour tables lack: one probe each and one shared
        wait of self.wait seconds, so no number of dead destinations stalls
        a run.  resolve() then answers from the tables and raises the errors
        (an address not on-link, no route, no answer)."""
        missing = {}
        for option, address, mac_override, tunnel in requests:
            if mac_override or (address, mac_override, tunnel) in self._resolved:
                continue
            try:
                hop = (self._route(option, address)["gateway"] or address) if tunnel else address
                info, vlan = self._locate(option, hop)
            except XvsError:
                continue              # resolve() says so
            if not vlan and hop not in self._probed and hop not in self._known(info["index"]):
                missing.setdefault((info["index"], info["name"]), set()).add(hop)
        if missing:
            self._neighbours.update(_netinfo.resolve_all(missing, self.wait, self.alive))
            self._probed.update(a for addresses in missing.values() for a in addresses)

    def _resolve(self, option, address, mac_override):
        info, vlan = self._locate(option, address)
        if mac_override:
            dest_mac = mac_override
        elif vlan:
            raise XvsError("%s=%s: on VLAN %d of trunk %s the MAC cannot be probed; give mac"
                           % (option, address, vlan, info["name"]))
        else:
            self.prepare([(option, address, None, False)])
            dest_mac = self._known(info["index"]).get(address)
            if not dest_mac:
                raise XvsError("%s=%s: %s" % (option, address,
                                              _netinfo.unresolved(address, info["name"], self.wait)))
        return {"address": address, "mac": dest_mac, "src_mac": info["mac"],
                "ifindex": info["index"], "vlan": vlan,
                "tx_port": self.dp.tx_port(info["index"]) or 0}

    def view(self, svc):
        """A service as the maps hold it, with where each destination is."""
        return view(svc, [self.dest_view(d) for d in svc["destinations"]])

    def dest_view(self, d):
        """mac is the destination's, or for a tunnel its next hop's."""
        out = {"address": d["address"], "weight": d["weight"], "state": d["state"], "mac": d["mac"],
               "interface": self.ifname(d["ifindex"]), "vlan": d["vlan"]}
        if "mtu" in d:
            out.update(tunnel_source=d["tun_src"], mtu=d["mtu"])
        return out


def view(svc, destinations):
    """A service as the modules return it, with the destinations' views."""
    out = {"address": svc["address"], "port": svc["port"], "protocol": svc["protocol"],
           "sticky": svc["sticky"], "destinations": destinations}
    out.update(forwarding_config(svc["forwarding"]))
    return out


def info(bal, source_prefixes=0):
    """What xvs_info returns of the maps: attachment, services, counters,
    and the source_prefixes busiest client /20s."""
    services = []
    census = bal.dp.flow_census()
    for s in bal.dp.services():
        v = bal.view(s)
        v["counters"] = bal.dp.service_stats(s["index"])
        v["digest"] = bal.dp.digest(s)
        for dv, d in zip(v["destinations"], s["destinations"]):
            dv["counters"] = bal.dp.dest_stats(s["index"], d["slot"])
            dv["active_flows"] = census["active"][flow_owner(s["index"], d)]
        services.append(v)
    return {"attachment": {"bpffs": bal.root, "interfaces": bal.status["interfaces"],
                           "program": bal.status["program"], "sizes": bal.status["sizes"],
                           "vlans": bal.status["vlans"], "tunnel_source": bal.status["tunnel_source"]},
            "services": services, "counters": bal.dp.counters(),
            "flow_table": bal.dp.flow_table(census),
            "source_prefixes": bal.dp.busiest_prefixes(source_prefixes)}
