# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""xvs-agent's scheduler: the health checks that drain failing destinations.

The agent reads the state of record (the services, their checks and
min_healthy), checks every destination of a checked service on its own
schedule, and when a destination crosses its fall or rise count writes the
health file and re-applies the record through the planner, under the host
lock, as the boot restore does: the desired state is never changed, only
masked (see _health).  Every change of a destination or a service is one
log line with its reason.

It runs as xvs-agent.service on the system Python with the standard
library (and python3-prometheus-client for the metrics, see _metrics),
from the same library zip as the restore; the command is _agent_cli, the
probes of each check type _probes.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import concurrent.futures
import os
import threading
import time

from ansible_collections.xvs.lb.plugins.module_utils import _announce, _health, _layout as L, _maintenance, _planner, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._balancer import Balancer
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, pinned_abi
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError
from ansible_collections.xvs.lb.plugins.module_utils._journal import ERR, NOTICE, WARNING
from ansible_collections.xvs.lb.plugins.module_utils._probes import run_check

RELOAD_EVERY = 1.0      # s between looks at the state of record for changes
RETRY_EVERY = 5.0       # s before an apply that failed (no attachment yet) is tried again
RESOLVE_EVERY = 2.0     # s between probes of destinations not in the maps yet
TICK = 0.05             # s the loop waits for a check to finish or one to fall due
MAX_WORKERS = 32        # checks in flight at once


class Target(object):
    """One checked destination of one service: its check and what the
    checks found so far."""

    def __init__(self, key, address, check, up, problem=None):
        self.key, self.address = key, address
        self.check, self.problem = check, problem   # problem: the check's config is bad
        self.up = up
        self.streak = 0          # results in a row that disagree with up
        self.reason = "not checked yet"
        self.duration = None     # s the last check took
        self.due = 0.0
        self.busy = False
        self.failures = 0        # failed checks since the agent started
        self.transitions = 0     # up/down changes since the agent started
        self.changed_at = None   # wall-clock time of the last change


class Agent(object):
    """The checks of one state of record, and with an announcer (see
    _announce) its VIPs announced while their services are up (policy
    "any" or "all" of a VIP's services).  run() until stop is set; the
    metrics read snapshot() from another thread.  log(line, priority)
    takes each event as it happens (see _journal).

    Nothing here waits on a destination: the agent's runs of the planner
    probe the destinations the maps do not hold yet without waiting for
    them (Balancer(wait=0)), and look again every RESOLVE_EVERY seconds,
    adding each once it answers; every step that can take long tells
    systemd's watchdog the agent is alive (alive())."""

    def __init__(self, state_file, log, clock=time.monotonic, announcer=None, policy="any", alive=None,
                 wall=time.time):
        self.state_file, self.log, self.clock, self.wall = state_file, log, clock, wall
        self.alive = alive or (lambda: None)   # called each loop, and while waiting for the lock
        self.announcer, self.policy = announcer, policy
        self.announced = {}      # vip -> announced?, as last set (draining VIPs are announced)
        self.draining = set()    # the VIPs announced for a graceful shutdown
        self.maintenance = None  # the record's maintenance section (see _maintenance)
        self.phase = None        # None (in service), DRAINING or WITHDRAWN
        self.drain_from = None   # (clock, new_flows counter) when the drain last sampled
        self.drain_started = None
        self.announce_due = False
        self.announce_at = 0.0
        self.bpffs = None
        self.services = {}       # key -> desired service
        self.targets = {}        # (key, address) -> Target
        self.service_up = {}     # key -> bool, as last reported
        self.pending = False     # health to write and apply
        self.retry_at = 0.0
        self.unresolved = {}     # (key, address) -> reason: in the record, not in the maps
        self.resolve_at = 0.0
        self._saved = None       # the health last written
        self.applied_at = None   # wall-clock time of the last apply that succeeded
        self.apply_failures = 0  # applies that failed since the agent started
        self._stamp = None
        self._said = set()       # problems already logged once
        self._guard = threading.Lock()

    def _once(self, line, priority=ERR):
        if line not in self._said:
            self._said.add(line)
            self.log(line, priority)

    # ---- the state of record ------------------------------------------------------
    def reload(self):
        """Read the record again if it changed; False while it cannot be
        read (logged once)."""
        try:
            st = os.stat(self.state_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return True
            record = _state.load(self.state_file, required=True)
        except (OSError, XvsError) as e:
            self._once("xvs-agent: %s" % (e if isinstance(e, XvsError) else
                                          "state_file=%s: %s" % (self.state_file, e.strerror)))
            return False
        entries, problems = {}, {}
        for i, raw in enumerate(record["services"]):
            label = "%s: services[%d]" % (self.state_file, i)
            try:
                try:
                    entry = _spec.service(label, raw)
                except XvsError as e:
                    # a bad check alone does not take the service's other
                    # facts with it: that check fails, the rest stands
                    entry = _spec.service(label, dict(raw, check=None))
                    problems[_spec.service_key(entry)] = str(e)
            except (XvsError, TypeError) as e:
                self._once("xvs-agent: %s (service skipped)" % e, WARNING)
                continue
            entries[_spec.service_key(entry)] = entry
        first = self._stamp is None
        known = _health.load(self.state_file) if first else {}
        services = _planner.overridden({}, entries)
        targets = {}
        for key, svc in services.items():
            if svc["check"] is None and key not in problems:
                continue
            for address in svc["destinations"]:
                old = self.targets.get((key, address))
                if old is not None and old.check == svc["check"] and old.problem == problems.get(key):
                    targets[(key, address)] = old
                    continue
                up = old.up if old is not None else address not in known.get(key, {})
                t = Target(key, address, svc["check"], up, problems.get(key))
                if not up:
                    t.reason = (known.get(key, {}).get(address) or "failing before the restart")
                targets[(key, address)] = t
        for problem in sorted(set(problems.values())):
            self._once("xvs-agent: %s: the check fails until it is fixed" % problem, WARNING)
        with self._guard:
            gone = [k for k, t in self.targets.items() if k not in targets and not t.up]
            self.bpffs, self.services, self.targets = record["bpffs"], services, targets
            self.maintenance = _state.maintenance_of(record)
        self._stamp = stamp
        # the first apply writes what a restarted agent knew back unchanged
        # and reports the services; a failing destination dropped from the
        # record leaves the health file
        self.pending = self.pending or first or bool(gone)
        self.log("xvs-agent: %d service(s), %d checked destination(s) in %s"
                 % (len(services), len(targets), self.state_file))
        return True

    # ---- checks -------------------------------------------------------------------
    def _check(self, t):
        start = self.clock()
        if t.problem:
            ok, reason = False, "check config: " + t.problem
        else:
            ok, reason = run_check(t.check, t.address, t.key)
        return ok, reason, self.clock() - start

    def result(self, t, ok, reason, took):
        """Count one check's result; a destination changes state at its
        fall or rise count."""
        t.duration = took
        t.failures += not ok
        if ok == t.up:
            t.streak, t.reason = 0, reason
            return
        t.streak += 1
        if t.streak < (t.check or _spec.CHECK_DEFAULTS)["rise" if ok else "fall"]:
            return
        t.up, t.streak, t.reason = ok, 0, reason
        t.transitions, t.changed_at = t.transitions + 1, self.wall()
        self.pending = True
        self.log("xvs-agent: %s destination %s %s: %s (%d %s check(s) in a row)"
                 % (_health.label(t.key), t.address, "up" if ok else "down", reason,
                    (t.check or _spec.CHECK_DEFAULTS)["rise" if ok else "fall"],
                    "good" if ok else "failed"), NOTICE if ok else WARNING)

    # ---- health applied -----------------------------------------------------------
    def down(self):
        out = {}
        for t in self.targets.values():
            if not t.up:
                out.setdefault(t.key, {})[t.address] = t.reason
        return out

    def services_down(self, down):
        """Keys of the services with fewer healthy destinations (desired
        weight above 0, not failing) than their min_healthy."""
        out = []
        for key, svc in self.services.items():
            healthy = sum(1 for a, d in svc["destinations"].items()
                          if d["weight"] > 0 and a not in down.get(key, ()))
            if healthy < svc["min_healthy"]:
                out.append(key)
        return out

    def apply(self):
        """Write the health file (when it changed) and re-apply the record
        masked by it, adding the destinations that answer now."""
        down = self.down()
        services_down = self.services_down(down)
        try:
            with _state.host_lock(waiting=self.alive):
                self._save_health(down, services_down)
                with Balancer(self.bpffs, wait=0, alive=self.alive) as bal:
                    run = _planner.Run(bal, self.state_file, lambda before: before, strict=False,
                                       record_required=True)
                    run.plan.apply()
        except XvsError as e:
            self._once("xvs-agent: cannot apply health yet (retrying every %gs): %s" % (RETRY_EVERY, e))
            self.retry_at = self.clock() + RETRY_EVERY
            self.apply_failures += 1
            if pinned_abi(self.bpffs) not in (None, L.ABI_VERSION):
                # the maps of an older data plane, as between the role's
                # install of this agent and xvs_attach's layout upgrade: the
                # old program still serves, so the VIPs stay announced as
                # the checks say (health reaches the maps after the upgrade)
                self._report_services(down, services_down)
            return
        self.pending, self.applied_at = False, self.wall()
        self._unresolved(run.plan.unresolved)
        self._report_services(down, services_down)

    def _report_services(self, down, services_down):
        """Log each service that went up or down, and decide the VIPs again."""
        for key in sorted(self.services):
            up = key not in services_down
            if self.service_up.get(key, True) != up:
                svc = self.services[key]
                self.log("xvs-agent: service %s %s: %d of %d destination(s) healthy, min_healthy %d"
                         % (_health.label(key), "up" if up else "down",
                            len(svc["destinations"]) - len(down.get(key, ())),
                            len(svc["destinations"]), svc["min_healthy"]), NOTICE if up else WARNING)
        self.service_up = dict((key, key not in services_down) for key in self.services)
        self.announce_due = self.announcer is not None

    def _save_health(self, down=None, services_down=None):
        """Write the health file when what it holds changed: the failing
        destinations, the services down and the announcements."""
        if down is None:
            down = self.down()
            services_down = self.services_down(down)
        announce = None
        if self.announcer is not None:
            announce = {"maintenance": self.phase, "announced": dict(
                (vip, _announce.DRAINING if vip in self.draining else _announce.ANNOUNCED)
                for vip, on in self.announced.items() if on)}
        if self._saved != (down, services_down, announce):
            _health.save(self.state_file, down, services_down, announce)
            self._saved = (down, services_down, announce)

    def _unresolved(self, found):
        """Log what the last apply left out of the maps, and what it added
        of what an earlier one left out."""
        now = dict(((key, addr), reason) for key, addr, reason in found)
        for (key, addr) in sorted(set(now) - set(self.unresolved)):
            self.log("xvs-agent: %s" % now[(key, addr)], WARNING)
        for (key, addr) in sorted(set(self.unresolved) - set(now)):
            if addr in self.services.get(key, {}).get("destinations", {}):
                self.log("xvs-agent: service %s destination %s answers: now in the maps"
                         % (_health.label(key), addr), NOTICE)
        with self._guard:
            self.unresolved = now
        self.resolve_at = self.clock() + RESOLVE_EVERY

    def announce(self):
        """Announce the VIPs whose services are up, withdraw the others.
        A VIP is decided once every checked destination of its services has
        been checked once, so a starting agent announces nothing it has not
        seen, and a VIP whose own destinations answer is announced without
        waiting for the checks of another VIP's dead ones."""
        if self.maintenance is not None or self.phase is not None:
            self.announce_due = False        # maintain() decides, and hands back
            return
        unseen = set(t.key[0] for t in self.targets.values() if t.duration is None)
        want = _announce.wanted(self.service_up, self.policy)
        want.update((vip, self.announced.get(vip, False)) for vip in unseen if vip in want)
        self.announce_due = bool(unseen)     # decide those once their checks are in
        if want == self.announced:
            return
        changes = self._set_routes([vip for vip, up in want.items() if up])
        if changes is None:
            return
        for vip, (before, after) in sorted(changes.items()):
            if after:
                self.log("xvs-agent: VIP %s announced" % vip, NOTICE)
            else:
                self.log("xvs-agent: VIP %s withdrawn: %s" % (
                    vip, "no longer in the state of record" if vip not in want else
                    "%s of its services down" % ("one" if self.policy == "all" else "all")), WARNING)
        with self._guard:
            self.announced = want
        self._save_health()

    def _set_routes(self, vips, draining=()):
        """The announcer's set(), its failure logged once and retried; None
        when it failed."""
        try:
            return self.announcer.set(vips, draining)
        except (OSError, XvsError) as e:
            self._once("xvs-agent: cannot announce yet (retrying every %gs): %s" % (RETRY_EVERY, e))
            self.announce_due, self.announce_at = True, self.clock() + RETRY_EVERY
            return None

    # ---- maintenance (see _maintenance) -------------------------------------------
    def _new_flows(self):
        """The data plane's new_flows counter, or None where it cannot be
        read (the drain then waits for its timeout)."""
        try:
            with DataPlane(self.bpffs) as dp:
                return dp.counters()["new_flows"]
        except Exception:     # no maps, maps of another ABI: nothing to count with
            return None

    def maintain(self):
        """Act on the record's maintenance: drain the announced VIPs, then
        withdraw them once the new-flow rate has fallen to drain_rate or
        drain_timeout has passed; hand the VIPs back to announce() when the
        record is back in service."""
        now, m = self.clock(), self.maintenance
        if m is None:
            self.phase, self.drain_from = None, None
            self.log("xvs-agent: maintenance ended: the VIPs are announced as their services are up", NOTICE)
            with self._guard:
                self.announced = {}       # announce() sets exactly what it wants
            self.announce_due, self.announce_at = self.announcer is not None, 0.0
            if self.announcer is None:
                self._save_health()
            return
        if self.phase is None:
            vips = sorted(vip for vip, on in self.announced.items() if on)
            if self.announcer is not None and vips:
                if self._set_routes((), vips) is None:
                    return
                self.phase, self.drain_started = _maintenance.DRAINING, now
                self.drain_from = (now, self._new_flows())
                with self._guard:
                    self.draining = set(vips)
                self.log("xvs-agent: maintenance: VIP(s) %s announced with GRACEFUL_SHUTDOWN until the new-flow "
                         "rate is at most %g/s (at most %gs)" % (", ".join(vips), m["drain_rate"], m["drain_timeout"]),
                         NOTICE)
            else:
                # a restarted agent may find routes a killed one left
                if self.announcer is not None and self._set_routes(()) is None:
                    return
                self._withdrawn("nothing was announced")
            self._save_health()
            return
        if self.phase != _maintenance.DRAINING or now - self.drain_from[0] < _maintenance.DRAIN_SAMPLE:
            return
        count = self._new_flows()
        rate = None
        if count is not None and self.drain_from[1] is not None:
            rate = (count - self.drain_from[1]) / (now - self.drain_from[0])
        self.drain_from = (now, count)
        if rate is not None and rate <= m["drain_rate"]:
            why = "the new-flow rate fell to %.1f/s after %.1fs" % (rate, now - self.drain_started)
        elif now - self.drain_started >= m["drain_timeout"]:
            why = "drain_timeout %gs passed (new-flow rate %s)" % (
                m["drain_timeout"], "unknown" if rate is None else "%.1f/s" % rate)
        else:
            return
        if self._set_routes(()) is None:
            return
        self._withdrawn(why)
        self._save_health()

    def _withdrawn(self, why):
        self.phase = _maintenance.WITHDRAWN
        with self._guard:
            self.announced = dict((vip, False) for vip in self.announced)
            self.draining = set()
        self.log("xvs-agent: maintenance: every VIP withdrawn: %s" % why, NOTICE)

    def withdraw(self):
        """Withdraw every VIP (the agent is stopping)."""
        if self.announcer is None:
            return
        try:
            for vip in self.announcer.set(()):
                self.log("xvs-agent: VIP %s withdrawn: the agent is stopping" % vip, NOTICE)
        except (OSError, XvsError) as e:
            self.log("xvs-agent: could not withdraw the VIPs: %s" % e, ERR)

    def snapshot(self):
        """What the metrics show of the agent, consistent within itself:
        bpffs, services (desired), targets {(key, address): {up, duration
        (of the last check), timeout, failures, transitions, changed_at}},
        service_up {key: up}, announced {vip: announced?} (None without an
        announcer), applied_at and apply_failures."""
        with self._guard:
            return {"bpffs": self.bpffs, "services": self.services,
                    "targets": dict((k, {"up": t.up, "duration": t.duration, "failures": t.failures,
                                         "timeout": (t.check or _spec.CHECK_DEFAULTS)["timeout"],
                                         "transitions": t.transitions, "changed_at": t.changed_at})
                                    for k, t in self.targets.items()),
                    "applied_at": self.applied_at, "apply_failures": self.apply_failures,
                    "service_up": dict((key, key not in self.services_down(self.down()))
                                       for key in self.services),
                    "announced": dict(self.announced) if self.announcer else None,
                    "draining": set(self.draining), "maintenance": self.maintenance is not None,
                    "phase": self.phase}

    def run(self, stop, every=None):
        """Check until stop (a threading.Event) is set; every(now) is called
        once per loop (the textfile writer)."""
        next_reload = 0.0
        pool = concurrent.futures.ThreadPoolExecutor(MAX_WORKERS)
        inflight = {}
        try:
            while not stop.is_set():
                now = self.clock()
                if now >= next_reload:
                    self.reload()
                    next_reload = now + RELOAD_EVERY
                for t in list(self.targets.values()):
                    if not t.busy and t.due <= now:
                        t.busy, t.due = True, now + (t.check or _spec.CHECK_DEFAULTS)["interval"]
                        inflight[pool.submit(self._check, t)] = t
                done, dummy = concurrent.futures.wait(list(inflight), timeout=TICK,
                                                      return_when=concurrent.futures.FIRST_COMPLETED)
                if not inflight:
                    stop.wait(TICK)
                for fut in done:
                    t = inflight.pop(fut)
                    t.busy = False
                    with self._guard:
                        self.result(t, *fut.result())
                if self.unresolved and self.clock() >= self.resolve_at:
                    self.pending = True
                if self.pending and self.clock() >= self.retry_at and self.bpffs:
                    self.apply()
                if (self.maintenance is not None) != (self.phase is not None) or self.phase == _maintenance.DRAINING:
                    self.maintain()
                if self.announce_due and self.clock() >= self.announce_at:
                    self.announce()
                if every:
                    every(self.clock())
                self.alive()
        finally:
            # checks in flight end within their timeout; none new start
            pool.shutdown(wait=False, cancel_futures=True)
