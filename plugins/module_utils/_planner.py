# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one planner: desired services in, the difference to the maps out.

Every entry point that changes services goes through here: xvs_services
(merged, replaced, overridden, deleted), xvs_service and xvs_destination
(which express their options as one of those), and the boot restore
(overridden with the state of record).

A desired state is {(address, port, protocol): service}, each service
{address, port, protocol, destinations: {address: {address, weight, mac}}}
with mac None unless given, and a value for each of _spec.SERVICE_FIELDS
(sticky, check: None for a service xvs-agent does not check, min_healthy,
forwarding: {"method": name} and the method's parameters).  The states below turn the
desired state before a run and the run's entries (checked by _spec) into
the desired state after it; Plan compares that with the maps, read once,
and writes only the services that differ: a Maglev table is built only for
a service whose eligible destinations or weights change.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.xvs.lb.plugins.module_utils import _health, _layout as L, _maglev, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import dest_dict, svc_key
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

STATES = ("merged", "replaced", "overridden", "deleted")


def _service(key, fields, dests):
    """A desired service: its key, its field values, its destinations."""
    return dict(fields, address=key[0], port=key[1], protocol=key[2],
                destinations=dict((d["address"], d) for d in dests))


def _dest(address, weight, mac=None):
    return {"address": address, "weight": weight, "mac": mac}


def _exact(entry):
    """A listed service as replaced and overridden make it: left-out
    options take their defaults."""
    return _service(_spec.service_key(entry), dict((f.name, f.value(entry)) for f in _spec.SERVICE_FIELDS), [
        _dest(d["address"], _spec.DEFAULT_WEIGHT if d["weight"] is None else d["weight"], d["mac"])
        for d in entry["destinations"] or []])


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
        after[key] = _service(key, dict((f.name, f.value(e, cur[f.name])) for f in _spec.SERVICE_FIELDS),
                              dests.values())
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
    of record yet: weights as written, no MAC overrides, the other fields
    at their defaults."""
    defaults = dict((f.name, f.default) for f in _spec.SERVICE_FIELDS)
    return dict(((s["address"], s["port"], s["protocol"]),
                 _service((s["address"], s["port"], s["protocol"]),
                          dict(defaults, sticky=s["sticky"], forwarding=s["forwarding"]),
                          [_dest(d["address"], d["weight"]) for d in s["destinations"]]))
                for s in dp_services)


def sort_key(key):
    return (_maglev.sort_key(key[0]), key[1], key[2])


def to_config(desired):
    """A desired state in the config shape: services by address, port and
    protocol; destinations by address; mac only where it was given; each
    field's options as _spec.Field.config gives them (left out at their
    default, but sticky)."""
    out = []
    for key in sorted(desired, key=sort_key):
        s = desired[key]
        dests = []
        for a in sorted(s["destinations"], key=_maglev.sort_key):
            d = s["destinations"][a]
            dests.append(dict({"address": a, "weight": d["weight"]},
                              **({"mac": d["mac"]} if d["mac"] else {})))
        entry = {"address": s["address"], "port": s["port"], "protocol": s["protocol"], "destinations": dests}
        for f in _spec.SERVICE_FIELDS:
            entry.update(f.config(s[f.name]))
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
        dp = bal.dp
        current = dp.read_services() if current is None else current
        wanted_keys = set(svc_key(*key) for key in after)
        self.removes = [k for k in current if k not in wanted_keys]
        taken = set(v.index for k, (v, dummy) in current.items() if k in wanted_keys)
        self.unresolved = []   # (key, address, reason), in service order
        self.effective = self._resolve(current, option_labels, strict, down or {})
        self.writes = []
        for key in sorted(after, key=sort_key):
            sw = dp.plan_write(key, after[key], self.effective[key], current, taken)
            if sw is not None:
                self.writes.append(sw)
        self._current = current
        self._tables = {}      # the Maglev tables built, shared with apply()
        self._moved = None
        self.maps_changed = bool(self.writes or self.removes)
        self.changed = self.maps_changed or before != after

    def moved(self):
        """{service key: the share of its Maglev table whose destination
        this run changes} for each service it writes (1.0 for a new one):
        where new flows go differently, and where existing flows go
        differently once their records are gone (evicted, or at another
        balancer after a failover).  Computed from the maps as they were
        planned against: call it before apply()."""
        if self._moved is None:
            dp = self.bal.dp
            self._moved = dict((sw.service, round(dp.moved(sw, self._current, self._tables), 6))
                               for sw in self.writes)
        return self._moved

    def _resolve(self, current, option_labels, strict, down):
        """{key: the destinations to write}, each resolved (or reused from
        the maps), weighted and masked by health; every one that needs it
        probed at once (§3.2 step 4)."""
        bal, live = self.bal, {}
        for k, (v, slots) in current.items():
            live[k] = dict((d["address"], d) for d in (dest_dict(d, slot) for slot, d in slots.items()))
        work = []              # (key, address, desired, live to reuse or None, tunnel)
        for key in sorted(self.after, key=sort_key):
            svc, have = self.after[key], live.get(svc_key(*key), {})
            tunnel = L.FORWARDING[svc["forwarding"]["method"]].tunnel
            for addr in sorted(svc["destinations"]):
                d = svc["destinations"][addr]
                try:
                    cur = have.get(addr) if _reusable(bal, have.get(addr), d, tunnel, option_labels, key) else None
                except XvsError:
                    cur = None         # resolved again below, which says why it fails
                work.append((key, addr, d, cur, tunnel))
        bal.prepare([(_option(option_labels, key, addr), addr, d["mac"], tunnel)
                     for key, addr, d, cur, tunnel in work if cur is None])
        out = dict((key, []) for key in self.after)
        for key, addr, d, cur, tunnel in work:
            try:
                fwd = cur or bal.resolve(_option(option_labels, key, addr), addr, d["mac"], tunnel)
            except XvsError as e:
                if strict and addr not in self.before.get(key, {}).get("destinations", {}):
                    raise
                self.unresolved.append((key, addr, str(e)))
                continue
            failing = addr in down.get(key, ())
            out[key].append(dict(fwd, weight=0 if failing else d["weight"], failing=failing,
                                 state=state_of(d["weight"], failing)))
        return out

    def apply(self):
        """Write the maps: removed services first (their indexes may be
        reused), then each changed service in the per-service order that
        keeps every packet on a whole table, then the VIP set once."""
        if not self.maps_changed:
            return
        dp = self.bal.dp
        for k in self.removes:
            dp.remove(k, self._current)
        for sw in self.writes:
            dp.write(sw, self._tables)
            if self.bal.alive:
                self.bal.alive()     # a thousand services take seconds: the watchdog hears of them
        dp.sync_vips()

    def unresolved_report(self):
        """The destinations left out of the maps, as modules return them."""
        return [{"address": key[0], "port": key[1], "protocol": key[2], "destination": addr,
                 "reason": reason} for key, addr, reason in self.unresolved]

    def diff(self, key=None):
        return diff(self.before, self.after, key)


def diff(before, after, key=None):
    """A desired state before and after in the config shape; with key,
    that one service's."""
    if key is None:   # Ansible renders a diff of dicts, not of lists
        return {"before": {"config": to_config(before)}, "after": {"config": to_config(after)}}
    pick = [to_config(dict((k, v) for k, v in d.items() if k == key)) for d in (before, after)]
    return {"before": pick[0][0] if pick[0] else {}, "after": pick[1][0] if pick[1] else {}}


class UnattachedPlan(object):
    """The Plan of a check-mode run against a balancer that has no program
    attached yet (a first rollout checked before the run that attaches
    it): the maps will be empty, so every desired service is written
    (moved 1.0); its destinations cannot be resolved before there is an
    interface to resolve them on, so none are reported unresolved."""

    def __init__(self, before, after):
        self.before, self.after = before, after
        self.effective, self.unresolved, self.writes = {}, [], sorted(after, key=sort_key)
        self.changed = bool(after) or before != after

    def diff(self, key=None):
        return diff(self.before, self.after, key)

    def moved(self):
        return dict((key, 1.0) for key in self.writes)

    def unresolved_report(self):
        return []


def unresolved(desired, services):
    """[(service key, address)] of the desired destinations the maps do not
    hold (services: DataPlane.services()): not resolved yet, see Plan."""
    held = dict(((s["address"], s["port"], s["protocol"]), set(d["address"] for d in s["destinations"]))
                for s in services)
    return [(key, a) for key in sorted(desired, key=sort_key) for a in sorted(desired[key]["destinations"])
            if a not in held.get(key, ())]


def recorded(bal, state_file, required=False, current=None):
    """(record or None, desired state before a run): the state of record,
    or for a balancer that has none yet what its maps hold."""
    record = _state.load(state_file, bal.root, required=required)
    if record is not None:
        return record, from_config(record["services"], "%s: services" % state_file)
    current = bal.dp.read_services() if current is None else current
    return None, from_maps(bal.dp.service_dicts(current))


class UnattachedRun(object):
    """Run for check mode where nothing is attached at bpffs yet: the
    desired state before is the record's (or nothing), the plan an
    UnattachedPlan.  Nothing is ever applied."""

    def __init__(self, bpffs, state_file, transform):
        self.record = _state.load(state_file, bpffs)
        before = from_config(self.record["services"], "%s: services" % state_file) if self.record else {}
        self.plan = UnattachedPlan(before, transform(before))
        self.changed = self.plan.changed


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
        attach = self.record["attach"] if self.record else _state.attach_section_from_status(bal.status)
        self.plan = Plan(bal, before, transform(before), option_labels, strict, current,
                         _health.load(state_file))
        self.new_record = _state.make(bal.root, attach, to_config(self.plan.after),
                                      _state.maintenance_of(self.record))
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
