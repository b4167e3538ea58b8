# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the modules share: input validation, the host lock, and the plan
and apply steps for the attachment, services and destinations.

Every module runs plan() under the lock, returns there in check mode, and
otherwise applies exactly that plan: the check-mode answer and the real
run's are computed by the same code.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import errno
import fcntl
import ipaddress
import os
import re
import time

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _layout as L, _loader, _netinfo
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, DataPlaneError

LOCK_FILE = "/run/lock/xvs-lb.lock"
LOCK_TIMEOUT = 300
DEFAULT_BPFFS = "/sys/fs/bpf/xvs"
MAX_WEIGHT = 65535
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

# Errors that are the user's to fix: reported as one line, nothing changed.
EXPECTED_ERRORS = (DataPlaneError, _loader.LoaderError, _netinfo.NetInfoError, L.SizeError,
                   _bpf.BpfError)


class XvsError(Exception):
    pass


def run(module, work):
    """Run work() under the host lock; an expected error becomes the
    module's one-line failure."""
    # imported here: the boot-time restore uses this module without Ansible
    from ansible.module_utils.basic import missing_required_lib
    if not _netinfo.HAS_PYROUTE2:
        module.fail_json(msg=missing_required_lib("pyroute2"))
    try:
        with host_lock():
            return work()
    except (XvsError,) + EXPECTED_ERRORS as e:
        module.fail_json(msg=str(e))


def run_plan(module, plan):
    """For the service modules: plan(balancer, params) -> (ServicePlan,
    extra), applied outside check mode."""
    def work():
        bal = Balancer(module.params["bpffs"])
        try:
            planned = plan(bal, module.params)
            if not module.check_mode:
                planned[0].apply()
            return planned
        finally:
            bal.close()
    return run(module, work)


@contextlib.contextmanager
def host_lock(path=LOCK_FILE, timeout=LOCK_TIMEOUT):
    """Serialise xvs.lb runs on this host: one at a time changes the maps."""
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        os.makedirs(d, 0o755)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (IOError, OSError) as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise XvsError("another xvs.lb run has held %s for %ds" % (path, timeout))
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---- validation ---------------------------------------------------------------
def ipv4(option, value):
    try:
        a = ipaddress.IPv4Address(str(value))
    except ValueError:
        raise XvsError("%s=%s: not an IPv4 address" % (option, value))
    if a.is_unspecified or a.is_multicast or a == ipaddress.IPv4Address("255.255.255.255"):
        raise XvsError("%s=%s: not a unicast IPv4 address" % (option, value))
    return str(a)


def port(option, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise XvsError("%s=%s: must be a port number from 1 to 65535" % (option, value))
    return value


def weight(option, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WEIGHT:
        raise XvsError("%s=%s: must be an integer from 0 to %d" % (option, value, MAX_WEIGHT))
    return value


def mac(option, value):
    if not _MAC.match(str(value)):
        raise XvsError("%s=%s: not a MAC address (six hex octets separated by colons)"
                       % (option, value))
    raw = L.mac_bytes(value)
    if raw[0] & 1 or raw == b"\0" * 6:
        raise XvsError("%s=%s: not a unicast MAC address" % (option, value))
    return L.mac_str(raw)


def protocol(option, value):
    if value not in L.PROTOCOLS:
        raise XvsError("%s=%s: must be one of %s" % (option, value, ", ".join(L.PROTOCOLS)))
    return value


def bpffs(value):
    try:
        return _loader.check_root(value)
    except _loader.LoaderError as e:
        raise XvsError(str(e))


# ---- the balancer as the modules see it ---------------------------------------------
class Balancer(object):
    """The pinned program's state and maps under one bpffs root."""

    def __init__(self, root):
        self.root = bpffs(root)
        self.status = _loader.status(self.root)
        if self.status is None:
            raise XvsError("bpffs=%s: the xvs program is not attached here (no pins); "
                           "run xvs.lb.xvs_attach first" % self.root)
        self.dp = DataPlane(self.root)
        self._ifnames = None

    def close(self):
        self.dp.close()

    def ifname(self, index):
        if self._ifnames is None:
            self._ifnames = dict((_netinfo.interface(n)["index"], n) for n in self.status["interfaces"])
        return self._ifnames.get(index)

    def resolve(self, option, address, mac_override=None):
        """A destination's forwarding data: interface, VLAN, MACs."""
        interfaces = sorted(self.status["interfaces"])
        if not interfaces:
            raise XvsError("bpffs=%s: the program is not attached to any interface" % self.root)
        try:
            info, vlan = _netinfo.locate(address, interfaces, self.status["vlans"])
        except _netinfo.NetInfoError as e:
            raise XvsError("%s=%s: %s" % (option, address, e))
        if mac_override:
            dest_mac = mac_override
        elif vlan:
            raise XvsError("%s=%s: on VLAN %d of trunk %s the MAC cannot be probed; give mac"
                           % (option, address, vlan, info["name"]))
        else:
            try:
                dest_mac = _netinfo.resolve_mac(address, info)
            except _netinfo.NetInfoError as e:
                raise XvsError("%s=%s: %s" % (option, address, e))
        return {"address": address, "mac": dest_mac, "src_mac": info["mac"],
                "ifindex": info["index"], "vlan": vlan,
                "tx_port": self.dp.tx_port(info["index"]) or 0}

    def view(self, svc):
        """A service as modules return it and show it in diffs."""
        if svc is None:
            return None
        return {"address": svc["address"], "port": svc["port"], "protocol": svc["protocol"],
                "sticky": svc["sticky"],
                "destinations": [self.dest_view(d) for d in svc["destinations"]]}

    def dest_view(self, d):
        return {"address": d["address"], "weight": d["weight"], "mac": d["mac"],
                "interface": self.ifname(d["ifindex"]), "vlan": d["vlan"]}


def _forwarding(dests):
    """What set_service compares: everything but the slot."""
    return sorted((d["address"], d["weight"], d["mac"], d["src_mac"], d["ifindex"], d["vlan"],
                   d["tx_port"]) for d in dests)


class ServicePlan(object):
    """The change one module run makes to one service."""

    def __init__(self, bal, address, port_, proto, sticky, dests, remove=False):
        self.bal = bal
        self.key = (address, port_, proto)
        self.current = bal.dp.service(address, port_, proto)
        self.remove = remove
        self.sticky = sticky
        self.dests = dests
        self.before = bal.view(self.current)
        if remove:
            self.after = None
            self.changed = self.current is not None
            return
        if len(dests) > bal.dp.max_dests:
            raise XvsError("destinations: %d destinations exceed max_destinations=%d"
                           % (len(dests), bal.dp.max_dests))
        if self.current is None and bal.dp.service_count() >= bal.dp.max_services:
            raise XvsError("address=%s port=%d: all max_services=%d services are configured"
                           % (address, port_, bal.dp.max_services))
        self.after = bal.view({"address": address, "port": port_, "protocol": proto,
                               "sticky": sticky,
                               "destinations": sorted(dests, key=lambda d: d["address"])})
        self.changed = (self.current is None or self.current["sticky"] != sticky
                        or _forwarding(self.current["destinations"]) != _forwarding(dests))

    def apply(self):
        if not self.changed:
            return
        if self.remove:
            self.bal.dp.delete_service(*self.key)
        else:
            self.bal.dp.set_service(self.key[0], self.key[1], self.key[2], self.sticky, self.dests)

    def diff(self):
        return {"before": self.before or {}, "after": self.after or {}}


def existing_destinations(svc):
    return dict((d["address"], d) for d in (svc["destinations"] if svc else []))


def plan_service(bal, p):
    """xvs_service: p holds its options.  Returns (ServicePlan, None)."""
    address = ipv4("address", p["address"])
    svc_port = port("port", p["port"])
    proto = protocol("protocol", p["protocol"])
    if p["state"] == "absent":
        return ServicePlan(bal, address, svc_port, proto, False, [], remove=True), None
    current = bal.dp.service(address, svc_port, proto)
    existing = existing_destinations(current)
    listed = p["destinations"]
    wanted = {} if (p["purge_destinations"] and listed is not None) else dict(existing)
    seen = set()
    for i, item in enumerate(listed or []):
        label = "destinations[%d].address" % i
        addr = ipv4(label, item["address"])
        if addr in seen:
            raise XvsError("%s=%s: listed more than once" % (label, addr))
        seen.add(addr)
        w = weight("destinations[%d].weight" % i, item["weight"])
        base = existing.get(addr) or bal.resolve(label, addr)
        wanted[addr] = dict(base, weight=w)
    return ServicePlan(bal, address, svc_port, proto, p["sticky"], list(wanted.values())), None


def plan_destination(bal, p):
    """xvs_destination: p holds its options.  Returns (ServicePlan, address)."""
    vip = ipv4("service_address", p["service_address"])
    svc_port = port("service_port", p["service_port"])
    proto = protocol("protocol", p["protocol"])
    addr = ipv4("address", p["address"])
    current = bal.dp.service(vip, svc_port, proto)
    if current is None:
        raise XvsError("service_address=%s service_port=%d protocol=%s: no such service; "
                       "create it with xvs.lb.xvs_service" % (vip, svc_port, proto))
    dests = existing_destinations(current)
    if p["state"] == "absent":
        dests.pop(addr, None)
    else:
        w = weight("weight", p["weight"])
        override = mac("mac", p["mac"]) if p["mac"] else None
        have = dests.get(addr)
        if have is None or (override and override != have["mac"]):
            have = bal.resolve("address", addr, override)
        dests[addr] = dict(have, weight=w)
    return ServicePlan(bal, vip, svc_port, proto, current["sticky"], list(dests.values())), addr


# ---- attachment -------------------------------------------------------------------------
class AttachPlan(object):
    """Load, (re)attach and detach the program: what xvs_attach does."""

    def __init__(self, params, text):
        self.root = bpffs(params["bpffs"])
        self.text = text
        self.params = params
        self.allow_reset = params.get("allow_flow_table_reset", False)
        self.status = _loader.status(self.root) if os.path.isdir(self.root) else None
        current = dict(self.status["interfaces"]) if self.status else {}
        self.before = self._view(self.status) if self.status else {}
        self.load = False
        self.unpin = False
        self.to_attach = {}
        self.to_detach = []
        self.sizes = self.status["sizes"] if self.status else None
        self.vlans = self.status["vlans"] if self.status else {}
        if params["state"] == "absent":
            names = params.get("interfaces") or list(current)
            self.to_detach = [n for n in names if n in current]
            remaining = dict((n, m) for n, m in current.items() if n not in self.to_detach)
            self.unpin = self.status is not None and not remaining
            self.after = {} if self.unpin or not self.status else dict(self.before, interfaces=remaining)
        else:
            self._plan_present(current)
        self.changed = self.before != self.after

    def _plan_present(self, current):
        p = self.params
        if not p.get("interfaces"):
            raise XvsError("interfaces: at least one interface is required with state=present")
        for name in p["interfaces"]:
            try:
                _netinfo.interface(name)
            except _netinfo.NetInfoError:
                raise XvsError("interfaces: %s does not exist on this host" % name)
        parent = self.root if os.path.isdir(self.root) else os.path.dirname(self.root)
        if not _loader._is_bpffs(parent):
            raise XvsError("bpffs=%s: %s is not on a mounted bpf filesystem" % (self.root, parent))
        given = dict((k, v) for k, v in (p.get("sizes") or {}).items() if v is not None)
        try:
            self.sizes = L.sizes(**given)
            self.vlans = _loader.normalise_vlans(p.get("vlans"))
        except (L.SizeError, _loader.LoaderError) as e:
            raise XvsError("sizes: %s" % e if isinstance(e, L.SizeError) else str(e))
        bid = _loader.build_id(self.text, self.root, self.sizes)
        self.load = self.status is None or self.status["build_id"] != bid
        if self.status:
            resized = _loader.check_pins(self.root, self.sizes)
            if resized and not self.allow_reset:
                refusal = _loader.resize_refusal(resized, self.sizes, self.status["sizes"])
                raise XvsError("sizes: " + refusal)
        mode = p.get("mode") or "auto"
        for name in p["interfaces"]:
            want = current.get(name, "auto") if mode == "auto" else mode
            if self.load or current.get(name) != want:
                self.to_attach[name] = want
        self.to_detach = [n for n in current if n not in p["interfaces"]]
        interfaces = dict((n, self.to_attach.get(n) or current[n]) for n in p["interfaces"])
        self.after = {"interfaces": interfaces, "sizes": self.sizes, "vlans": self.vlans,
                      "build_id": bid, "bpffs": self.root}

    @staticmethod
    def _view(st):
        return {"interfaces": st["interfaces"], "sizes": st["sizes"], "vlans": st["vlans"],
                "build_id": st["build_id"], "bpffs": st["bpffs"]}

    def apply(self):
        if not self.changed:
            return
        for name in self.to_detach:
            _loader.detach(name, self.root)
        if self.unpin:
            _loader.unpin_all(self.root)
            return
        if self.params["state"] == "absent":
            return
        _loader.check_bpffs(self.root)
        if self.load:
            prog = _loader.load(self.root, self.sizes, allow_flow_reset=self.allow_reset,
                                text=self.text)
        else:
            prog = _loader.open_pinned(self.root)
        with prog:
            for name, mode in sorted(self.to_attach.items()):
                self.after["interfaces"][name] = _loader.attach(prog, name, mode)
        with DataPlane(self.root) as dp:
            _loader.write_vlans(dp, self.vlans)

    def result(self):
        st = _loader.status(self.root) if not self.unpin and os.path.isdir(self.root) else None
        if st is None:
            return {"bpffs": self.root, "interfaces": {}, "program": None, "sizes": self.sizes,
                    "vlans": self.vlans}
        return {"bpffs": self.root, "interfaces": st["interfaces"], "program": st["program"],
                "sizes": st["sizes"], "vlans": st["vlans"], "build_id": st["build_id"]}


def info(root):
    """Everything xvs_info returns: attachment, services, counters."""
    bal = Balancer(root)
    try:
        services = []
        for s in bal.dp.services():
            v = bal.view(s)
            v["counters"] = bal.dp.service_stats(s["index"])
            for dv, d in zip(v["destinations"], s["destinations"]):
                dv["counters"] = bal.dp.dest_stats(s["index"], d["slot"])
            services.append(v)
        return {"attachment": {"bpffs": bal.root, "interfaces": bal.status["interfaces"],
                               "program": bal.status["program"], "sizes": bal.status["sizes"],
                               "vlans": bal.status["vlans"]},
                "services": services, "counters": bal.dp.counters(),
                "flow_table": bal.dp.flow_table()}
    finally:
        bal.close()


def restore(state, log):
    """Apply a desired state as the xvs role keeps it on disk (state.json):
    the attachment, then every service; with purge, remove the services not
    listed.  The boot-time restore calls this: the same plans the modules
    run, so a restored balancer is what the last role run left.  log(line)
    reports each step."""
    attach = dict(state["attach"], state="present")
    attach.setdefault("bpffs", DEFAULT_BPFFS)
    with host_lock():
        text = _loader.read_source(attach.get("source"))
        plan = AttachPlan(attach, text)
        plan.apply()
        where = ", ".join("%s (%s)" % kv for kv in sorted(plan.result()["interfaces"].items()))
        log("xvs: program %s on %s" % ("reloaded" if plan.load else "kept", where))
        bal = Balancer(attach["bpffs"])
        errors = []
        try:
            listed = set()
            for svc in state.get("services", []):
                p = dict({"protocol": "tcp", "sticky": False, "destinations": None,
                          "purge_destinations": True, "state": "present"}, **svc)
                p["destinations"] = [dict({"weight": 1}, **d) for d in p["destinations"] or []]
                listed.add((p["address"], p["port"], p["protocol"]))
                try:   # one unresolvable backend must not keep the others down
                    sp = plan_service(bal, p)[0]
                    sp.apply()
                except (XvsError,) + EXPECTED_ERRORS as e:
                    errors.append(str(e))
                    log("xvs: service %s:%s/%s: %s" % (p["address"], p["port"], p["protocol"], e))
                    continue
                log("xvs: service %s:%d/%s %s" % (sp.key + ("applied" if sp.changed else "unchanged",)))
            if state.get("purge"):
                for s in bal.dp.services():
                    key = (s["address"], s["port"], s["protocol"])
                    if key not in listed:
                        bal.dp.delete_service(*key)
                        log("xvs: service %s:%d/%s removed (not listed)" % key)
        finally:
            bal.close()
    if errors:
        raise XvsError("%d service(s) not restored: %s" % (len(errors), "; ".join(errors)))
