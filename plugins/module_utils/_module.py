# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Ansible side of the modules: one lock per run, expected errors as
one-line failures, and the service modules' shared converge step.  The
rest of module_utils knows nothing of Ansible."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.xvs.lb.plugins.module_utils import _netinfo, _planner, _state
from ansible_collections.xvs.lb.plugins.module_utils._balancer import Balancer
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
        with Balancer(p["bpffs"]) as bal:
            r = _planner.Run(bal, p["state_file"], transform, option_labels)
            if not module.check_mode:
                r.apply()
            return r, view(r, bal) if view else None
    return run(module, work)


def gather(module):
    """The desired state, read under the lock; nothing planned or written."""
    p = module.params

    def work():
        with Balancer(p["bpffs"]) as bal:
            return _planner.recorded(bal, p["state_file"])[1]
    return run(module, work)


def service_view(r, bal, key):
    """One service after the run as xvs_service and xvs_destination return
    it: destinations with the MAC, interface and VLAN they are reached by."""
    svc = r.plan.after.get(key)
    if svc is None:
        return None
    return bal.view(dict(svc, destinations=sorted(r.plan.effective.get(key, []), key=lambda d: d["address"])))


def exit_with(module, r, key=None, **result):
    """changed, the destinations left unresolved (each also a warning),
    and with --diff the desired state before and after (of the service
    key only, for the one-service modules)."""
    if module._diff:
        result["diff"] = r.plan.diff(key)
    for u in r.plan.unresolved_report():
        module.warn("%s:%d/%s destination %s is not in the maps until it answers: %s"
                    % (u["address"], u["port"], u["protocol"], u["destination"], u["reason"]))
    module.exit_json(changed=r.changed, unresolved=r.plan.unresolved_report(), **result)
