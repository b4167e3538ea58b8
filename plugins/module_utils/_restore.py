# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The boot restore: re-attach the program and apply the state of record
as state=overridden would, through the same planner as the modules.

bpffs does not survive a reboot; the xvs role's xvs-restore.service runs
this at boot.  The record is checked whole before anything is attached or
written: a missing, unreadable or corrupt record is an error that changes
no map.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import sys
import zipfile

from ansible_collections.xvs.lb.plugins.module_utils import _journal, _loader, _planner, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._attach import AttachPlan
from ansible_collections.xvs.lb.plugins.module_utils._balancer import Balancer
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

# Where the program lies in the restore's library (a zip or a directory
# holding ansible_collections/xvs/lb/...), beside the control-plane code.
PROGRAM = "ansible_collections/xvs/lb/files/xdp_lb.c"


def _attach_params(record, state_file):
    attach = record["attach"]
    interfaces = attach.get("interfaces")
    if not isinstance(interfaces, list) or not all(isinstance(n, str) for n in interfaces):
        raise XvsError("state_file=%s: attach.interfaces=%s: must be a list of interface names"
                       % (state_file, interfaces))
    mode = attach.get("mode") or "auto"
    if mode not in _loader.MODES:
        raise XvsError("state_file=%s: attach.mode=%s: must be one of %s"
                       % (state_file, mode, ", ".join(_loader.MODES)))
    return {"interfaces": interfaces, "mode": mode, "sizes": attach.get("sizes") or {},
            "vlans": attach.get("vlans") or {}, "tunnel_source": attach.get("tunnel_source") or {},
            "bpffs": record["bpffs"], "state": "present"}


def program(library):
    """The XDP program's source from the restore's library."""
    try:
        if zipfile.is_zipfile(library):
            with zipfile.ZipFile(library) as z:
                return z.read(PROGRAM).decode()
        return _loader.read_source(os.path.join(library, PROGRAM))
    except (KeyError, IOError, OSError) as e:
        raise XvsError("library=%s: no XDP program in it (%s)" % (library, e))


def main(library, argv):
    """The restore command: python3 LIBRARY [STATE_FILE]; exit 1 with one
    line on stderr when the record cannot be applied."""
    state_file = argv[0] if argv else _spec.DEFAULT_STATE_FILE
    try:
        restore(state_file, _journal.Log(), text=program(library))
    except XvsError as e:
        _journal.Log(sys.stderr)("xvs-restore: %s" % e, _journal.ERR)
        return 1
    return 0


def restore(state_file, log, source=None, text=None):
    """Apply the record at state_file; log(line, priority) reports each
    step as it happens.  Destinations that do not resolve (a backend still
    booting, or off while drained for maintenance) are all probed at once
    and waited for once, then left out of the maps (not out of the record)
    and logged as warnings: every service comes up with the destinations
    that answer, and xvs-agent adds the others when they do.  Only a record
    that cannot be applied at all is an error."""
    with _state.host_lock():
        record = _state.load(state_file, required=True)
        if record["attach"] is None:
            log("xvs: %s records no attachment: nothing to restore" % state_file)
            return
        _planner.from_config(record["services"], "%s: services" % state_file)  # checked first
        params = _attach_params(record, state_file)
        attach = AttachPlan(params, text if text is not None else _loader.read_source(source))
        attach.apply()
        where = ", ".join("%s (%s)" % kv for kv in sorted(attach.result()["interfaces"].items()))
        log("xvs: program %s on %s" % ("loaded" if attach.load else "kept", where))
        with Balancer(record["bpffs"]) as bal:
            run = _planner.Run(bal, state_file, lambda before: before, strict=False,
                               record_required=True)
            run.plan.apply()   # the record is what is applied: it is not rewritten
        plan = run.plan
        log("xvs: %d service(s) in the record: %d written, %d removed, %d unchanged"
            % (len(plan.after), len(plan.writes), len(plan.removes),
               len(plan.after) - len(plan.writes)))
        for key, addr, reason in plan.unresolved:
            log("xvs: unresolved, left out of the maps until it answers: %s" % reason, _journal.WARNING)
        if plan.unresolved:
            log("xvs: %d destination(s) unresolved; xvs-agent adds each when it answers"
                % len(plan.unresolved), _journal.WARNING)
