# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Ansible side of the modules: one lock per run, expected errors as
one-line failures, and the service modules' shared converge step.  The
rest of module_utils knows nothing of Ansible."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.xvs.lb.plugins.module_utils import _balancer, _loader, _netinfo, _planner, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import flow_owner
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError


def check(module, fn):
    """fn() with an expected error as the module's one-line failure."""
    try:
        return fn()
    except XvsError as e:
        module.fail_json(msg=str(e))


def run(module, work):
    """work() under the host lock, errors as check() reports them."""
    if not _netinfo.HAS_PYROUTE2:
        module.fail_json(msg=missing_required_lib("pyroute2"))

    def locked():
        with _state.host_lock():
            return work()
    return check(module, locked)


def converge(module, transform, option_labels=None, view=None):
    """One run of the planner for a service module: read the record and
    the maps, plan transform(before), apply it outside check mode.
    Returns (Run, view(run, balancer)), the view taken while the maps are
    open."""
    p = module.params

    def work():
        root = _spec.bpffs(p["bpffs"])
        if module.check_mode and _loader.status(root) is None:
            # a first rollout checked before the run that attaches: plan
            # against the empty maps the attach will make
            r = _planner.UnattachedRun(root, p["state_file"], transform)
            return r, view(r, None) if view else None
        with _balancer.Balancer(root) as bal:
            r = _planner.Run(bal, p["state_file"], transform, option_labels)
            r.plan.moved()      # what moves, from the tables before the run writes the new ones
            if not module.check_mode:
                r.apply()
            return r, view(r, bal) if view else None
    return run(module, work)


def gather(module):
    """The desired state, read under the lock; nothing planned or written."""
    p = module.params

    def work():
        with _balancer.Balancer(p["bpffs"]) as bal:
            return _planner.recorded(bal, p["state_file"])[1]
    return run(module, work)


def service_view(r, bal, key):
    """One service after the run as xvs_service and xvs_destination return
    it: destinations with the MAC, interface and VLAN they are reached by."""
    svc = r.plan.after.get(key)
    if svc is None:
        return None
    if bal is None:      # nothing attached yet (check mode): the service as desired
        return _balancer.view(svc, [{"address": a, "weight": d["weight"]} for a, d in sorted(svc["destinations"].items())])
    return bal.view(dict(svc, destinations=sorted(r.plan.effective.get(key, []), key=lambda d: d["address"])))


def exit_with(module, r, key=None, **result):
    """changed, the destinations left unresolved (each also a warning),
    the share of each written service's Maglev table that moves, and with
    --diff the desired state before and after (of the service key only,
    for the one-service modules) with the moved shares."""
    moved = r.plan.moved()
    result["moved"] = [{"address": k[0], "port": k[1], "protocol": k[2], "moved": share}
                       for k, share in sorted(moved.items(), key=lambda kv: _planner.sort_key(kv[0]))]
    if module._diff:
        result["diff"] = r.plan.diff(key)
        if key is None and moved:
            result["diff"]["after"]["moved"] = dict(("%s:%d/%s" % k, share) for k, share in moved.items())
        elif key in moved:
            result["diff"]["after"] = dict(result["diff"]["after"], moved=moved[key])
    for u in r.plan.unresolved_report():
        module.warn("%s:%d/%s destination %s is not in the maps until it answers: %s"
                    % (u["address"], u["port"], u["protocol"], u["destination"], u["reason"]))
    module.exit_json(changed=r.changed, unresolved=r.plan.unresolved_report(), **result)


# xvs_services' and xvs_destination's wait_drained option
WAIT_DRAINED_OPTIONS = dict(
    timeout=dict(type="float", default=300.0),
    max_flows=dict(type="int", default=0),
)
WAIT_EVERY = 1.0      # s between counts of the drained destinations' flows


def check_wait_drained(module):
    """The wait_drained option checked before anything changes."""
    opts = module.params.get("wait_drained")
    for name in ("timeout", "max_flows"):
        if opts and opts[name] < 0:
            module.fail_json(msg="wait_drained.%s=%s: must not be negative" % (name, opts[name]))


def wait_drained(module, r, wanted=None):
    """After the run, wait until every drained destination (desired weight
    0) of the services the run wrote or was given, wanted {key: address or
    None}, holds at most max_flows live flows (_dataplane.flow_census),
    or fail at the timeout naming each count.  Returns the last counts
    ([{address, port, protocol, destination, active_flows}]); nothing in
    check mode, where nothing was drained yet."""
    opts = module.params.get("wait_drained")
    if not opts or module.check_mode:
        return None
    targets = [(key, addr) for key, only in sorted((wanted or {}).items(), key=lambda kv: _planner.sort_key(kv[0]))
               for addr, d in sorted(r.plan.after.get(key, {}).get("destinations", {}).items())
               if d["weight"] == 0 and only in (None, addr)]
    deadline = time.monotonic() + opts["timeout"]
    while True:
        counts = check(module, lambda: _drained_counts(module.params["bpffs"], targets))
        busy = [c for c in counts if c["active_flows"] > opts["max_flows"]]
        if not busy:
            return counts
        if time.monotonic() >= deadline:
            module.fail_json(msg="wait_drained: after %gs, %s (max_flows %d)" % (opts["timeout"], "; ".join(
                "%s:%d/%s destination %s still has %d live flow(s)" % (
                    c["address"], c["port"], c["protocol"], c["destination"], c["active_flows"]) for c in busy),
                opts["max_flows"]), drained=counts, changed=r.changed)
        time.sleep(WAIT_EVERY)


def _drained_counts(bpffs, targets):
    """[{address, port, protocol, destination, active_flows}] of targets
    ((service key, destination address)) the maps hold."""
    out = []
    with _balancer.Balancer(bpffs) as bal:
        census = bal.dp.flow_census()
        for key, addr in targets:
            svc = bal.dp.service(*key)
            found = [d for d in (svc or {}).get("destinations", []) if d["address"] == addr]
            if found:
                out.append({"address": key[0], "port": key[1], "protocol": key[2], "destination": addr,
                            "active_flows": census["active"][flow_owner(svc["index"], found[0])]})
    return out
