# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Load, (re)attach and detach the program: what xvs_attach plans and
applies, and what the state of record keeps of it for the boot restore."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L, _loader, _netinfo
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane
from ansible_collections.xvs.lb.plugins.module_utils._spec import XvsError, bpffs


def record_section(interfaces, mode, sizes, vlans, tunnel_source):
    """The attachment as the state of record keeps it (JSON: VLAN ids as
    strings, interfaces sorted)."""
    return {"interfaces": sorted(interfaces), "mode": mode, "sizes": dict(sizes),
            "vlans": dict((str(k), v) for k, v in sorted((vlans or {}).items())),
            "tunnel_source": dict(tunnel_source or {})}


def section_from_status(st):
    """The record's attachment for a balancer attached before it had a
    record: what is attached now, in one mode where all agree."""
    modes = set(st["interfaces"].values())
    return record_section(st["interfaces"], modes.pop() if len(modes) == 1 else "auto",
                          st["sizes"], st["vlans"], st["tunnel_source"])


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
        parent = self.root if os.path.isdir(self.root) else os.path.dirname(self.root)
        if not _loader._is_bpffs(parent):
            raise XvsError("bpffs=%s: %s is not on a mounted bpf filesystem" % (self.root, parent))
        given = dict((k, v) for k, v in (p.get("sizes") or {}).items() if v is not None)
        try:
            self.sizes = L.sizes(**given)
            self.vlans = _loader.normalise_vlans(p.get("vlans"))
            self.tunnel_source = _loader.normalise_tunnel_source(p.get("tunnel_source"))
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
            return section_from_status(dict(self.status, interfaces=self.after["interfaces"]))
        return record_section(self.params["interfaces"], self.params.get("mode") or "auto",
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
            _loader.write_vlans(dp, self.vlans)
            _loader.write_tunnel_source(dp, self.tunnel_source)

    def result(self):
        st = _loader.status(self.root) if not self.unpin and os.path.isdir(self.root) else None
        if st is None:
            return {"bpffs": self.root, "interfaces": {}, "program": None, "sizes": self.sizes,
                    "vlans": self.vlans, "tunnel_source": self.tunnel_source}
        return {"bpffs": self.root, "interfaces": st["interfaces"], "program": st["program"],
                "sizes": st["sizes"], "vlans": st["vlans"], "tunnel_source": st["tunnel_source"],
                "build_id": st["build_id"]}
