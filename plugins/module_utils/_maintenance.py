# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planned maintenance: a balancer taken out of the fleet gracefully, and
kept out until it is taken back in.

Maintenance is a fact of the state of record ("maintenance": {"since",
"drain_timeout", "drain_rate"}), written by xvs_maintenance (the role's
xvs_maintenance), so an agent restart or a reboot keeps the balancer out.
xvs-agent acts on it (see Agent.maintain), while its checks go on:

    in service --> draining: every announced VIP moves to the drain table
                   (see _announce): BIRD exports it with the GRACEFUL_SHUTDOWN
                   community (RFC 8326, 65535:0) and a lowered preference, so
                   the routers prefer the other balancers without a withdrawal
               --> withdrawn: once the balancer's new-flow rate (the data
                   plane's new_flows counter, sampled every DRAIN_SAMPLE s)
                   is at most drain_rate, or drain_timeout has passed
               --> in service when the record no longer says maintenance.

Existing flows keep their backend when the router moves them: every
balancer of the fleet holds the same Maglev tables.  The agent writes its
phase and its announcements to the health file (see _health), which
xvs_info, the xvs command and the module's wait read.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

from ansible_collections.xvs.lb.plugins.module_utils import _health, _state
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

DRAIN_TIMEOUT = 60.0    # s a drain waits at most for the new-flow rate to fall
DRAIN_RATE = 0.0        # new flows per second at or below which the drain is done
DRAIN_SAMPLE = 1.0      # s between samples of the new-flow counter
DRAINING, WITHDRAWN = "draining", "withdrawn"     # the agent's phases (None: in service)
WAIT_EVERY = 0.2        # s between looks of xvs_maintenance's wait


def section(drain_timeout, drain_rate, since):
    """The record's maintenance section, its numbers checked."""
    if drain_timeout is None or drain_timeout < 0:
        raise XvsError("drain_timeout=%s: must be 0 or more seconds" % drain_timeout)
    if drain_rate is None or drain_rate < 0:
        raise XvsError("drain_rate=%s: must be 0 or more new flows per second" % drain_rate)
    return {"since": since, "drain_timeout": float(drain_timeout), "drain_rate": float(drain_rate)}


def wanted(record, enabled, drain_timeout=DRAIN_TIMEOUT, drain_rate=DRAIN_RATE):
    """The maintenance section the record should hold: None in service; a
    balancer already in maintenance keeps its since."""
    if not enabled:
        return None
    old = _state.maintenance_of(record)
    return section(drain_timeout, drain_rate, old["since"] if old else time.time())


class MaintenanceRun(object):
    """xvs_maintenance's run: the record with maintenance set or cleared.
    The caller holds the host lock."""

    def __init__(self, state_file, bpffs, enabled, drain_timeout=DRAIN_TIMEOUT, drain_rate=DRAIN_RATE):
        self.state_file = state_file
        self.record = _state.load(state_file, bpffs)
        self.maintenance = wanted(self.record, enabled, drain_timeout, drain_rate)
        if self.record is None:
            # a balancer rolled out in maintenance: the record the attach and
            # the services will fill, out of service from the start
            self.new_record = _state.make(bpffs, None, [], self.maintenance) if enabled else None
        else:
            self.new_record = _state.make(self.record["bpffs"] or bpffs, self.record["attach"],
                                          self.record["services"], self.maintenance)
        self.changed = self.new_record is not None and self.new_record != self.record

    def apply(self):
        if self.changed:
            _state.save(self.state_file, self.new_record)


def view(state_file, bpffs=None):
    """The balancer's maintenance as xvs_info and `xvs status` show it:
    {in_maintenance, since, drain_timeout, drain_rate, agent (what the
    agent last said: see _health.announcements)}."""
    m = _state.maintenance_of(_state.load(state_file, bpffs)) or {}
    return {"in_maintenance": bool(m), "since": m.get("since"), "drain_timeout": m.get("drain_timeout"),
            "drain_rate": m.get("drain_rate"), "agent": _health.announcements(state_file)}


def done(state_file, enabled, routes):
    """Whether the agent has finished acting on the record: in maintenance,
    no route of the agent's is left (routes: {vip: state}, see
    _announce.Announcer.routes) and the agent, if one has written
    announcements, says withdrawn; in service, the agent no longer says
    maintenance.  Returns (done, what the agent said)."""
    said = _health.announcements(state_file)
    phase = said.get("maintenance") if said else None
    if enabled:
        return not routes and (said is None or phase == WITHDRAWN), said
    return phase is None, said


def wait(state_file, enabled, routes, timeout, clock=time.monotonic, sleep=time.sleep):
    """Wait until done(); routes() reads the agent's routes.  Returns what
    the agent said; an XvsError at the timeout says what is left."""
    deadline = clock() + timeout
    while True:
        now_routes = routes()
        ok, said = done(state_file, enabled, now_routes)
        if ok:
            return said
        if clock() >= deadline:
            if enabled:
                raise XvsError(
                    "wait_timeout=%g: after %gs the VIPs are still announced (%s; xvs-agent says %s): "
                    "is xvs-agent running? The record keeps the balancer in maintenance" % (
                        timeout, timeout, ", ".join("%s %s" % kv for kv in sorted(now_routes.items())) or "none",
                        (said or {}).get("maintenance") or "nothing"))
            raise XvsError("wait_timeout=%g: after %gs xvs-agent still says %s: is it running? The record "
                           "has the balancer back in service" % (timeout, timeout, (said or {}).get("maintenance")))
        sleep(WAIT_EVERY)
