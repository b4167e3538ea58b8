# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one planner: desired services in, the difference to the maps out.

Every entry point that changes services goes through here: xvs_services
(merged, replaced, overridden, deleted), xvs_service and xvs_destination
(which express their options as one of those), and the boot restore
(overridden with the state of record).

A desired state is {(address, port, protocol): service}, each service
{address, port, protocol, sticky, check, min_healthy, forwarding, gue_port,
destinations: {address: {address, weight, mac}}} with mac None unless
given, check None for a service xvs-agent does not check and gue_port None
unless forwarding is gue.  The states below turn the
desired state before a run and the run's entries (checked by _spec) into
the desired state after it; Plan compares that with the maps, read once,
and writes only the services that differ: a Maglev table is built only for
a service whose eligible destinations or weights change.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import functools
import ipaddress

from ansible_collections.xvs.lb.plugins.module_utils import _health, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._attach import section_from_status
from ansible_collections.xvs.lb.plugins.module_utils._balancer import EXPECTED_ERRORS
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, dest_dict, svc_key
from ansible_collections.xvs.lb.plugins.module_utils._spec import XvsError

STATES = ("merged", "replaced", "overridden", "deleted")


def _service(address, port, protocol, sticky, dests, check=None,
             min_healthy=_spec.DEFAULT_MIN_HEALTHY, tunnel=(_spec.DEFAULT_FORWARDING, None)):
    return {"address": address, "port": port, "protocol": protocol, "sticky": sticky,
            "check": check, "min_healthy": min_healthy, "forwarding": tunnel[0],
            "gue_port": tunnel[1], "destinations": dict((d["address"], d) for d in dests)}


def _dest(address, weight, mac=None):
    return {"address": address, "weight": weight, "mac": mac}


def _exact(entry):
    """A listed service as replaced and overridden make it: left-out
    options take their defaults."""
    sticky = _spec.DEFAULT_STICKY if entry["sticky"] is None else entry["sticky"]
    least = _spec.DEFAULT_MIN_HEALTHY if entry["min_healthy"] is None else entry["min_healthy"]
    return _service(entry["address"], entry["port"], entry["protocol"], sticky, [
        _dest(d["address"], _spec.DEFAULT_WEIGHT if d["weight"] is None else d["weight"], d["mac"])
        for d in entry["destinations"] or []], entry["check"], least,
        _spec.forwarding(entry["label"], entry["forwarding"], entry["gue_port"]))


def merged(before, entries):
    """Listed services created or updated, their listed destinations set;
    options left out keep their current values (a check given replaces
    the current one whole); nothing else touched."""
    after = dict(before)
    for key, e in entries.items():
        cur = before.get(key)
        if cur is None:
            after[key] = _exact(e)
            continue
        dests = dict(cur["destinations"])
        for d in e["destinations"] or []:
            have = dests.get(d["address"]) or _dest(d["address"], _spec.DEFAULT_WEIGHT)
            dests[d["address"]] = _dest(d["address"],
                                        have["weight"] if d["weight"] is None else d["weight"],
                                        have["mac"] if d["mac"] is None else d["mac"])
        after[key] = _service(e["address"], e["port"], e["protocol"],
                              cur["sticky"] if e["sticky"] is None else e["sticky"], dests.values(),
                              cur["check"] if e["check"] is None else e["check"],
                              cur["min_healthy"] if e["min_healthy"] is None else e["min_healthy"],
                              _spec.forwarding(e["label"], e["forwarding"], e["gue_port"],
                                               (cur["forwarding"], cur["gue_port"])))
    return after


def replaced(before, entries):
    """Each listed service ends exactly as given; unlisted ones untouched."""
    after = dict(before)
    after.update((key, _exact(e)) for key, e in entries.items())
    return after


def overridden(before, entries):
    """Exactly the listed services."""
    return dict((key, _exact(e)) for key, e in entries.items())


def deleted(before, entries):
    """The listed services removed; with none listed, every service."""
    if not entries:
        return {}
    return dict((key, s) for key, s in before.items() if key not in entries)


TRANSFORMS = {"merged": merged, "replaced": replaced, "overridden": overridden, "deleted": deleted}


def from_config(config, label="config"):
    """A desired state from a list in the config shape (checked)."""
    return overridden({}, _spec.services(config, label))


def from_maps(dp_services):
    """The desired state the maps imply, for a balancer that has no state
    of record yet: weights as written, no MAC overrides."""
    return dict(((s["address"], s["port"], s["protocol"]),
                 _service(s["address"], s["port"], s["protocol"], s["sticky"],
                          [_dest(d["address"], d["weight"]) for d in s["destinations"]],
                          tunnel=(s["forwarding"],
                                  s["gue_port"] if s["forwarding"] == "gue" else None)))
                for s in dp_services)


@functools.lru_cache(maxsize=8192)
def _address(text):
    """Addresses are checked already: sort them as numbers, IPv4 before
    IPv6 (the two do not compare), parsing each once."""
    a = ipaddress.ip_address(text)
    return a.version, a


def _sort_key(key):
    return (_address(key[0]), key[1], key[2])


def to_config(desired):
    """A desired state in the config shape: services by address, port and
    protocol; destinations by address; mac only where it was given; check
    only where there is one (without its unset options), min_healthy and
    forwarding only where they are not the default, gue_port with gue."""
    out = []
    for key in sorted(desired, key=_sort_key):
        s = desired[key]
        dests = []
        for a in sorted(s["destinations"], key=_address):
            d = s["destinations"][a]
            dests.append(dict({"address": a, "weight": d["weight"]},
                              **({"mac": d["mac"]} if d["mac"] else {})))
        entry = {"address": s["address"], "port": s["port"], "protocol": s["protocol"],
                 "sticky": s["sticky"], "destinations": dests}
        if s["check"] is not None:
            entry["check"] = dict((k, v) for k, v in s["check"].items() if v is not None)
        if s["min_healthy"] != _spec.DEFAULT_MIN_HEALTHY:
            entry["min_healthy"] = s["min_healthy"]
        if s["forwarding"] != _spec.DEFAULT_FORWARDING:
            entry["forwarding"] = s["forwarding"]
        if s["gue_port"] is not None:
            entry["gue_port"] = s["gue_port"]
        out.append(entry)
    return out


def labels(entries):
    """{(service key, destination address): option label} for errors that
    name where in the input a destination came from."""
    return dict(((key, d["address"]), d["label"] + "address")
                for key, e in entries.items() for d in e["destinations"] or [])


def remove_destination(key, address):
    """xvs_destination state=absent as a transform."""
    def transform(before):
        svc = dict(before[key])
        svc["destinations"] = dict((a, d) for a, d in svc["destinations"].items() if a != address)
        after = dict(before)
        after[key] = svc
        return after
    return transform


def _option(option_labels, key, address):
    """How errors name a destination: where in the input it came from."""
    return (option_labels or {}).get((key, address), "service %s:%d/%s destination" % key)


def _reusable(bal, cur, d, tunnel, option_labels, key):
    """Whether a destination's forwarding data in the maps (cur) still
    serves: the same method, the MAC override (if any) it was resolved with,
    and for a tunnel the source and MTU it would take now (xvs_attach's
    tunnel_source or the route's; the route's or the link's MTU).
    Otherwise it is resolved again."""
    if cur is None or d["mac"] not in (None, cur["mac"]) or ("mtu" in cur) != tunnel:
        return False
    if not tunnel:
        return True
    now = bal.tunnel(_option(option_labels, key, cur["address"]), cur["address"], cur["ifindex"])
    return (cur["tun_src"], cur["mtu"]) == (now["tun_src"], now["mtu"])


def state_of(weight, failing):
    """A destination's state in the maps (docs/design.md section 2.5)."""
    return "failing" if failing else "up" if weight else "drained"


class Plan(object):
    """What one run writes to the maps to make them hold `after`.

    Planning reads the maps once and resolves the destinations they do not
    hold yet, all at once (one probe each, one shared wait: see
    Balancer.prepare); it writes nothing, so check mode returns the same
    plan a real run applies.  Every limit is checked here, before apply()
    writes anything.  A destination the run adds to a service must resolve
    (strict, the modules: an error naming it); one the desired state held
    already, or any with strict=False (the boot restore, xvs-agent), is
    left out of the maps when it does not resolve, not out of the desired
    state, and listed in `unresolved`, so a backend that is off (drained
    for maintenance, or not booted yet) keeps neither the other services
    nor an unrelated change down; the agent adds it once it answers.
    down ({service key: {address: reason}}, see _health) masks failing
    destinations: they are written with weight 0, marked failing.
    """

    def __init__(self, bal, before, after, option_labels=None, strict=True, current=None,
                 down=None):
        self.bal, self.before, self.after = bal, before, after
        down = down or {}
        self.unresolved = []   # (key, address, reason), in service order
        dp = bal.dp
        current = dp.read_services() if current is None else current
        live = {}
        for k, (v, slots) in current.items():
            dicts = [dest_dict(d, slot) for slot, d in slots.items()]
            live[k] = dict((d["address"], d) for d in dicts)
        wanted_keys = set(svc_key(*key) for key in after)
        self.removes = [k for k in current if k not in wanted_keys]
        taken = set(v.index for k, (v, dummy) in current.items() if k in wanted_keys)
        self.writes = []
        self.effective = {}    # key -> the resolved destinations written
        work = []              # (key, address, desired, live to reuse or None, tunnel)
        for key in sorted(after, key=_sort_key):
            svc, have = after[key], live.get(svc_key(*key), {})
            tunnel = svc["forwarding"] != "l2"
            for addr in sorted(svc["destinations"]):
                d = svc["destinations"][addr]
                try:
                    cur = have.get(addr) if _reusable(bal, have.get(addr), d, tunnel, option_labels, key) else None
                except EXPECTED_ERRORS:
                    cur = None         # resolved again below, which says why it fails
                work.append((key, addr, d, cur, tunnel))
        bal.prepare([(_option(option_labels, key, addr), addr, d["mac"], tunnel)
                     for key, addr, d, cur, tunnel in work if cur is None])
        resolved = {}
        for key, addr, d, cur, tunnel in work:
            try:
                fwd = cur or bal.resolve(_option(option_labels, key, addr), addr, d["mac"], tunnel)
            except EXPECTED_ERRORS as e:
                if strict and addr not in before.get(key, {}).get("destinations", {}):
                    raise
                self.unresolved.append((key, addr, str(e)))
                continue
            failing = addr in down.get(key, ())
            resolved.setdefault(key, []).append(dict(fwd, weight=0 if failing else d["weight"],
                                                     failing=failing, state=state_of(d["weight"], failing)))
        for key in sorted(after, key=_sort_key):
            svc = after[key]
            dests = self.effective[key] = resolved.get(key, [])
            sw = dp.plan_write(key[0], key[1], key[2], svc["sticky"], dests, current, taken,
                               svc["forwarding"], svc["gue_port"] or 0)
            if sw is not None:
                self.writes.append(sw)
        self._current = current
        self.maps_changed = bool(self.writes or self.removes)
        self.changed = self.maps_changed or before != after

    def apply(self):
        """Write the maps: removed services first (their indexes may be
        reused), then each changed service in the per-service order that
        keeps every packet on a whole table, then the VIP set once."""
        if not self.maps_changed:
            return
        dp = self.bal.dp
        for k in self.removes:
            dp.remove(k, self._current)
        tables = {}
        for sw in self.writes:
            dp.write(sw, tables)
            if self.bal.alive:
                self.bal.alive()     # a thousand services take seconds: the watchdog hears of them
        dp.sync_vips()

    def unresolved_report(self):
        """The destinations left out of the maps, as modules return them."""
        return [{"address": key[0], "port": key[1], "protocol": key[2], "destination": addr,
                 "reason": reason} for key, addr, reason in self.unresolved]

    def diff(self, key=None):
        """The desired state before and after in the config shape; with key,
        that one service's."""
        if key is None:   # Ansible renders a diff of dicts, not of lists
            return {"before": {"config": to_config(self.before)},
                    "after": {"config": to_config(self.after)}}
        pick = [to_config(dict((k, v) for k, v in d.items() if k == key))
                for d in (self.before, self.after)]
        return {"before": pick[0][0] if pick[0] else {}, "after": pick[1][0] if pick[1] else {}}


def unresolved(desired, services):
    """[(service key, address)] of the desired destinations the maps do not
    hold (services: DataPlane.services()): not resolved yet, see Plan."""
    held = dict(((s["address"], s["port"], s["protocol"]), set(d["address"] for d in s["destinations"]))
                for s in services)
    return [(key, a) for key in sorted(desired, key=_sort_key) for a in sorted(desired[key]["destinations"])
            if a not in held.get(key, ())]


def recorded(bal, state_file, required=False, current=None):
    """(record or None, desired state before a run): the state of record,
    or for a balancer that has none yet what its maps hold."""
    record = _state.load(state_file, bal.root, required=required)
    if record is not None:
        return record, from_config(record["services"], "%s: services" % state_file)
    current = bal.dp.read_services() if current is None else current
    return None, from_maps(bal.dp.service_dicts(current))


class Run(object):
    """One run against one balancer's maps and its state of record: the
    desired state before (see recorded()), the desired state after
    (transform(before)), the Plan for the maps (masked by the health
    xvs-agent found) and the record to write.  The caller holds the host
    lock; nothing is written before apply()."""

    def __init__(self, bal, state_file, transform, option_labels=None, strict=True,
                 record_required=False):
        self.bal, self.state_file = bal, state_file
        current = bal.dp.read_services()
        self.record, before = recorded(bal, state_file, record_required, current)
        attach = self.record["attach"] if self.record else section_from_status(bal.status)
        self.plan = Plan(bal, before, transform(before), option_labels, strict, current,
                         _health.load(state_file))
        self.new_record = _state.make(bal.root, attach, to_config(self.plan.after))
        self.record_changed = self.record != self.new_record
        self.changed = self.plan.changed or self.record_changed

    def apply(self):
        """The maps, then the record: the record holds what was applied.  A
        run that fails half-way through the maps leaves the old record, and
        the next run plans against the maps again, so it completes."""
        self.plan.apply()
        if self.record_changed:
            _state.save(self.state_file, self.new_record)


def transform(state, entries):
    """xvs_services' state as a function of the desired state before."""
    if state not in TRANSFORMS:
        raise XvsError("state=%s: must be one of %s" % (state, ", ".join(STATES)))
    return lambda before: TRANSFORMS[state](before, entries)


class AttachRun(object):
    """xvs_attach's run: its AttachPlan, and the state of record with the
    attachment it leaves (the services as recorded, or for a balancer that
    has no record yet as its maps hold them; none once it is unpinned)."""

    def __init__(self, attach_plan, state_file):
        self.plan, self.state_file = attach_plan, state_file
        self.record = _state.load(state_file, attach_plan.root)
        section = attach_plan.record()
        if section is None:
            services = []
        elif self.record is not None:
            services = self.record["services"]
        elif attach_plan.status:
            with DataPlane(attach_plan.root) as dp:
                services = to_config(from_maps(dp.services()))
        else:
            services = []
        self.new_record = _state.make(attach_plan.root, section, services)
        self.record_changed = self.record != self.new_record
        self.changed = attach_plan.changed or self.record_changed

    def apply(self):
        self.plan.apply()
        if self.record_changed:
            _state.save(self.state_file, self.new_record)
