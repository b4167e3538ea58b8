# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A DSR backend's kernel state: the VIPs on an interface (lo) and the
sysctls direct server return needs (arp_ignore, arp_announce,
rp_filter), read, planned and written as one, so that check mode and
--diff say exactly what a run changes.

Why a module of ours: the realserver role set them with `command` tasks,
which check mode skips (it reported no change where the run then made
two).  ansible.posix.sysctl would cover the sysctls, but no well-kept
module puts an address on an interface, and a dependency on another
collection would have to be fetched from Galaxy, which the machines this
collection is tested on cannot reach.  The addresses go through pyroute2
(netlink), as the balancer's modules do; the sysctls through /proc/sys.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import os
import re
import socket

from ansible_collections.xvs.lb.plugins.module_utils import _spec
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
except ImportError:  # reported by the module with missing_required_lib
    IPRoute = None
    NetlinkError = OSError

PROC_SYS = "/proc/sys"
_SYSCTL = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_-]+)+$")
IFA_F_NODAD = 0x02     # an IPv6 VIP is on every backend by design: no duplicate address detection


def prefix(address):
    return 128 if ":" in address else 32


def _sysctl_path(name):
    if not _SYSCTL.match(name):
        raise XvsError("sysctls: %s: not a sysctl name (as net.ipv4.conf.all.arp_ignore)" % name)
    return os.path.join(PROC_SYS, *name.split("."))


def read_sysctl(name):
    try:
        with open(_sysctl_path(name)) as f:
            return f.read().strip()
    except (IOError, OSError) as e:
        raise XvsError("sysctls: %s: cannot be read (%s)" % (name, e.strerror))


class Plan(object):
    """What making interface hold vips (state present; none of them with
    absent) and the sysctls hold their values takes: before and after as
    {addresses, sysctls}, the addresses to add and remove, the sysctls to
    write."""

    def __init__(self, vips, interface, sysctls, state):
        self.vips = sorted(set(_spec.ip("vips[%d]" % i, v) for i, v in enumerate(vips or [])),
                           key=lambda a: (":" in a, ipaddress.ip_address(a)))
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=interface)
            if not index:
                raise XvsError("interface=%s: does not exist on this host" % interface)
            self.index = index[0]
            have = set("%s/%d" % (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                       for family in (socket.AF_INET, socket.AF_INET6)
                       for a in ipr.get_addr(index=self.index, family=family))
        wanted = ["%s/%d" % (v, prefix(v)) for v in self.vips]
        held = [w for w in wanted if w in have]
        self.add = [w for w in wanted if w not in have] if state == "present" else []
        self.remove = held if state == "absent" else []
        current = dict((name, read_sysctl(name)) for name in sorted(sysctls or {}))
        want = dict((name, str(value)) for name, value in (sysctls or {}).items())
        self.write = dict((k, v) for k, v in want.items() if current[k] != v)
        self.before = {"addresses": held, "sysctls": current}
        self.after = {"addresses": wanted if state == "present" else [],
                      "sysctls": dict(current, **want)}
        self.changed = bool(self.add or self.remove or self.write)

    def apply(self):
        with IPRoute() as ipr:
            for op, cidrs in (("add", self.add), ("del", self.remove)):
                for cidr in cidrs:
                    address, length = cidr.split("/")
                    flags = {"flags": IFA_F_NODAD} if ":" in address and op == "add" else {}
                    try:
                        ipr.addr(op, index=self.index, address=address, prefixlen=int(length), **flags)
                    except NetlinkError as e:
                        raise XvsError("vips: %s %s: %s" % (op, cidr, e))
        for name, value in sorted(self.write.items()):
            with open(_sysctl_path(name), "w") as f:
                f.write(value)
