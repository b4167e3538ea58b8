# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""VIP announcement over BGP, with BIRD 2 as the speaker.

xvs-agent announces a VIP by putting a host route for it (a blackhole: it
only marks the VIP, nothing forwards by it) in a kernel routing table of
its own, with a protocol number of its own; the BIRD configuration the xvs
role writes learns that table and exports its host routes to the BGP
neighbours with next hop self.  Withdrawing is removing the route.  Why a
kernel table and not BIRD's own static routes: BIRD cannot add routes at
run time from its control socket, and a table of the kernel's is empty
after a reboot, so nothing is announced before the agent has checked, and
it outlives a BIRD restart (BIRD learns it again).

The routes also outlive the agent, so xvs-agent.service runs `xvs-agent
--withdraw` after the agent stops for any reason (ExecStopPost), and a
watchdog restarts an agent that stops looping.

The BGP sessions' state is read from BIRD's control socket.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import socket

from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

try:
    from pyroute2 import IPRoute
except ImportError:  # the agent reports it when announcing is asked for
    IPRoute = None

# rtm_protocol of the agent's routes: not one iproute2's rt_protos assigns,
# so the agent never touches a route it did not make
ROUTE_PROTO = 253
RTN_BLACKHOLE = 6
ANNOUNCE_POLICIES = ("any", "all")
ANNOUNCED, DRAINING = "announced", "draining"     # a VIP's route, in which table


def wanted(services_up, policy):
    """The VIPs to announce: {vip: announce?} from {service key: up}; with
    "any" a VIP is announced while any of its services is up, with "all"
    only while all are."""
    by_vip = {}
    for key, up in services_up.items():
        by_vip.setdefault(key[0], []).append(up)
    pick = any if policy == "any" else all
    return dict((vip, pick(ups)) for vip, ups in by_vip.items())


class Announcer(object):
    """The agent's host routes in two kernel tables: table holds the VIPs
    announced, drain_table (table + 1 unless given) the VIPs announced
    for a graceful shutdown (RFC 8326): the role's BIRD configuration
    learns it with a higher preference and exports its routes with the
    GRACEFUL_SHUTDOWN community and a lowered preference, so the routers
    move the traffic to the other balancers before the route is withdrawn
    (see _maintenance)."""

    def __init__(self, table, drain_table=None):
        if IPRoute is None:
            raise XvsError("announcing VIPs needs pyroute2")
        self.table = table
        self.drain_table = drain_table or table + 1
        self.tables = {ANNOUNCED: self.table, DRAINING: self.drain_table}

    def _present(self, ipr):
        """{(vip, state)} of the agent's routes in the two tables."""
        return set((r.get_attr("RTA_DST"), state) for state in (ANNOUNCED, DRAINING)
                   for family in (socket.AF_INET, socket.AF_INET6)
                   for r in ipr.get_routes(family=family, table=self.tables[state])
                   if r["proto"] == ROUTE_PROTO)

    @staticmethod
    def _by_vip(present):
        """{vip: state} of _present()'s pairs; a VIP in both tables, for the
        instant of a move, is draining."""
        return dict(sorted(present, key=lambda p: p[1] == DRAINING))

    def routes(self):
        """{vip: ANNOUNCED or DRAINING} of the routes in the tables now."""
        with IPRoute() as ipr:
            return self._by_vip(self._present(ipr))

    def announced(self):
        """The VIPs whose routes are in either table now."""
        return set(self.routes())

    def _route(self, ipr, op, vip, state):
        v6 = ipaddress.ip_address(vip).version == 6
        ipr.route(op, dst=vip, dst_len=128 if v6 else 32, family=socket.AF_INET6 if v6 else socket.AF_INET,
                  table=self.tables[state], proto=ROUTE_PROTO, type=RTN_BLACKHOLE)

    def set(self, vips, draining=()):
        """Exactly these VIPs announced, and those of draining (VIPs not in
        vips) announced for a graceful shutdown: {vip: (state before, state
        after)} of the VIPs that changed, None for not announced.  Every
        route is added before any is removed, so a VIP moving between the
        tables is never withdrawn on the way."""
        want = dict((vip, ANNOUNCED) for vip in vips)
        want.update((vip, DRAINING) for vip in draining)
        with IPRoute() as ipr:
            present = self._present(ipr)
            have = self._by_vip(present)
            wanted = set(want.items())
            for vip, state in sorted(wanted - present):
                self._route(ipr, "add", vip, state)
            for vip, state in sorted(present - wanted):
                self._route(ipr, "del", vip, state)
        return dict((vip, (have.get(vip), want.get(vip))) for vip in sorted(set(have) | set(want))
                    if have.get(vip) != want.get(vip))


# ---- BIRD's control socket ------------------------------------------------------
# The birdc protocol: each reply line starts with a four-digit code, then
# "-" when more lines of the reply follow or " " on the last; a line that
# starts with a space continues the previous code.  0000 ends a reply, 8xxx
# and 9xxx are errors.  Spoken here rather than through birdc so that a
# metrics scrape starts no process and gets the codes, not a rendering.
def bird_command(path, command, timeout=2.0):
    """[(code, text)] of one command on BIRD's control socket at path."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        f = s.makefile("rwb")
        f.readline()                        # 0001 BIRD x.y.z ready.
        f.write(command.encode() + b"\n")
        f.flush()
        out, code = [], None
        while True:
            line = f.readline().decode("utf-8", "replace").rstrip("\n")
            if not line:
                raise OSError("BIRD closed the control socket")
            if line[:4].isdigit():
                code, more, text = line[:4], line[4:5] == "-", line[5:]
            else:
                more, text = True, line[1:]
            out.append((code, text))
            if not more:
                return out
    finally:
        s.close()


def bgp_sessions(path):
    """[{'protocol', 'neighbor', 'state', 'established'}] of BIRD's BGP
    protocols ("show protocols all")."""
    sessions, current = [], None
    for code, text in bird_command(path, "show protocols all"):
        if code == "1002":                   # a protocol's summary row
            cols = text.split()
            current = None
            if len(cols) >= 4 and cols[1] == "BGP":
                current = {"protocol": cols[0], "neighbor": "", "state": cols[3],
                           "established": cols[-1] == "Established"}
                sessions.append(current)
        elif current is not None and text.strip().startswith("Neighbor address:"):
            current["neighbor"] = text.split(":", 1)[1].strip()
        elif code and code[0] in "89":
            raise OSError("BIRD: %s" % text)
    return sessions
