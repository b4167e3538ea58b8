# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Load, (re)attach and detach the program: what xvs_attach plans and
applies (AttachPlan), and its run with the state of record it leaves
(AttachRun)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L, _loader, _netinfo, _planner, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, pinned_abi
from ansible_collections.xvs.lb.plugins.module_utils._balancer import Balancer
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError


class AttachPlan(object):
    """Load, (re)attach and detach the program: what xvs_attach does."""

    def __init__(self, params, text, check_mode=False):
        """check_mode: a bpf filesystem not mounted yet is no error (a
        first rollout checked before the run that mounts it), but a
        warning in warnings."""
        self.root = _spec.bpffs(params["bpffs"])
        self.text = text
        self.params = params
        self.check_mode, self.warnings = check_mode, []
        self.allow_reset = params.get("allow_flow_table_reset", False)
        # maps of another data-plane layout: refused (DataPlane says why and
        # the way on) unless this run may replace them (an upgrade)
        abi = pinned_abi(self.root) if os.path.isdir(self.root) else None
        upgrading = (abi not in (None, L.ABI_VERSION) and params.get("allow_layout_upgrade")
                     and params["state"] == "present")
        self.upgrade_from = abi if upgrading else None
        if upgrading:
            self.status = None
            current = _loader.attached(self.root)
            self.before = {"abi": abi, "interfaces": dict(current), "bpffs": self.root}
        else:
            self.status = _loader.status(self.root) if os.path.isdir(self.root) else None
            current = dict(self.status["interfaces"]) if self.status else {}
            self.before = self._view(self.status) if self.status else {}
        self.upgrade_interfaces = dict(current)
        self.load = False
        self.unpin = False
        self.to_attach = {}
        self.to_detach = []
        self.sizes = self.status["sizes"] if self.status else None
        self.vlans = self.status["vlans"] if self.status else {}
        self.tunnel_source = self.status["tunnel_source"] if self.status else {}
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
        try:
            _loader.check_bpffs(self.root, create=False)
        except _loader.LoaderError as e:
            if not self.check_mode:
                raise
            self.warnings.append("%s: check mode plans it as mounted, as the run must find it" % e)
        given = dict((k, v) for k, v in (p.get("sizes") or {}).items() if v is not None)
        try:
            self.sizes = L.sizes(**given)
        except L.SizeError as e:
            raise XvsError("sizes: %s" % e)
        self.vlans = _spec.vlans(p.get("vlans"))
        self.tunnel_source = _spec.tunnel_source(p.get("tunnel_source"))
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
                      "tunnel_source": self.tunnel_source, "build_id": bid, "bpffs": self.root}

    @staticmethod
    def _view(st):
        return {"interfaces": st["interfaces"], "sizes": st["sizes"], "vlans": st["vlans"],
                "tunnel_source": st["tunnel_source"], "build_id": st["build_id"], "bpffs": st["bpffs"]}

    def record(self):
        """The attachment the state of record keeps after this run (None
        when the program is gone)."""
        if not self.after:
            return None
        if self.params["state"] == "absent":
            return _state.attach_section_from_status(dict(self.status, interfaces=self.after["interfaces"]))
        return _state.attach_section(self.params["interfaces"], self.params.get("mode") or "auto",
                                     self.sizes, self.vlans, self.tunnel_source)

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
            dp.write_vlans(self.vlans)
            dp.write_tunnel_source(self.tunnel_source)

    def result(self):
        st = _loader.status(self.root) if not self.unpin and os.path.isdir(self.root) else None
        if st is None:
            return {"bpffs": self.root, "interfaces": {}, "program": None, "sizes": self.sizes,
                    "vlans": self.vlans, "tunnel_source": self.tunnel_source}
        return {"bpffs": self.root, "interfaces": st["interfaces"], "program": st["program"],
                "sizes": st["sizes"], "vlans": st["vlans"], "tunnel_source": st["tunnel_source"],
                "build_id": st["build_id"]}


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
                services = _planner.to_config(_planner.from_maps(dp.services()))
        else:
            services = []
        if attach_plan.upgrade_from is not None and self.record is None:
            raise XvsError("allow_layout_upgrade: %s holds maps of data-plane ABI %d, and state_file=%s "
                           "has no state of record to put the services back from; nothing was changed"
                           % (attach_plan.root, attach_plan.upgrade_from, state_file))
        self.new_record = _state.make(attach_plan.root, section, services, _state.maintenance_of(self.record))
        self.record_changed = self.record != self.new_record
        self.changed = attach_plan.changed or self.record_changed

    def apply(self):
        if self.plan.upgrade_from is None:
            self.plan.apply()
        else:
            # the new maps are filled from the record the moment the new
            # program is attached (as the boot restore does); a failure on
            # the way puts the old program back
            with _loader.layout_upgrade(self.plan.root, self.plan.upgrade_interfaces):
                self.plan.apply()
                _state.save(self.state_file, self.new_record)
                with Balancer(self.plan.root) as bal:
                    _planner.Run(bal, self.state_file, lambda before: before, strict=False,
                                 record_required=True).plan.apply()
            return
        if self.record_changed:
            _state.save(self.state_file, self.new_record)
