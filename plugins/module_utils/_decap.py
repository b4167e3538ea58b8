# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The realserver's decapsulating XDP program (files/xdp_decap.c,
docs/design.md §2.14): compile, pin, configure, attach and remove it, and
the boot restore that does it again from the file the module keeps.

Its whole state is its configuration (no flows, nothing learned), so a new
build simply gets new maps, filled from the configuration before the
program replaces the old one on each interface.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import hashlib
import ipaddress
import json
import os
import sys
import zipfile

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _layout as L, _loader, _netinfo, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

DEFAULT_BPFFS = "/sys/fs/bpf/xvs-decap"
DEFAULT_CONFIG_FILE = "/etc/xvs/decap.json"
ENTRY = "xdp_decap"
METHODS = ("ipip", "gue")
# files/xdp_decap.c's -D sizes
MAX_VIPS, MAX_SOURCES = 1024, 256
# in the order of enum counter in xdp_decap.c
COUNTERS = ("decap_ipip", "decap_gue", "not_vip", "not_source")
# where the program lies in the boot restore's library (see _restore.PROGRAM)
LIBRARY_PROGRAM = "ansible_collections/xvs/lb/files/xdp_decap.c"


class Config(ctypes.Structure):
    """struct config of xdp_decap.c."""
    _fields_ = [("ipip", ctypes.c_uint8), ("check_sources", ctypes.c_uint8),
                ("gue_port", ctypes.c_uint16)]


MAPS = ("config", "vips", "sources", "vips6", "sources6", "counters")
# the address sets, each in a map per family
SETS = ("vips", "sources", "vips6", "sources6")


def default_source():
    return _loader.default_source("xdp_decap.c")


def normalise(p):
    """The module's (or the boot file's) options checked: {interfaces,
    decap, gue_port, vips, sources, mode, bpffs}, lists sorted."""
    interfaces = p.get("interfaces")
    if not isinstance(interfaces, list) or not interfaces \
            or not all(isinstance(n, str) and n for n in interfaces):
        raise XvsError("interfaces=%s: must be a list of interface names" % (interfaces,))
    decap = decap_methods(p.get("decap"))
    gue_port = p.get("gue_port")
    gue_port = _spec.port("gue_port", _spec.DEFAULT_GUE_PORT if gue_port is None else gue_port)
    out = {"interfaces": sorted(set(interfaces)), "decap": decap,
           "gue_port": gue_port if "gue" in decap else None, "mode": p.get("mode") or "auto",
           "bpffs": _spec.bpffs(p.get("bpffs") or DEFAULT_BPFFS)}
    if out["mode"] not in _loader.MODES:
        raise XvsError("mode=%s: must be one of %s" % (out["mode"], ", ".join(_loader.MODES)))
    for name, limit in (("vips", MAX_VIPS), ("sources", MAX_SOURCES)):
        given = p.get(name) or []
        if not isinstance(given, list):
            raise XvsError("%s=%s: must be a list of IPv4 or IPv6 addresses" % (name, given))
        addrs = sorted(set(_spec.ip("%s[%d]" % (name, i), a) for i, a in enumerate(given)),
                       key=lambda a: (":" in a, ipaddress.ip_address(a)))
        if len(addrs) > limit:
            raise XvsError("%s: %d addresses, at most %d" % (name, len(addrs), limit))
        out[name] = addrs
    if not out["vips"]:
        raise XvsError("vips: give the VIPs to decapsulate for (nothing else is)")
    return out


def decap_methods(value):
    """The tunnel types to undo, in METHODS order: one ("gue", as a
    record kept before a list was allowed says it) or several at once (a
    backend of an ipip service and a gue service)."""
    given = [value] if isinstance(value, str) else value
    if not isinstance(given, list) or not given or not all(m in METHODS for m in given):
        raise XvsError("decap=%s: must be one of %s, or a list of them" % (value, ", ".join(METHODS)))
    return [m for m in METHODS if m in given]


def build_id(text, root):
    return hashlib.sha256(("\0".join([text] + cflags(root))).encode()).hexdigest()[:32]


def cflags(root):
    return ['-DXVS_PIN_ROOT="%s"' % root, "-DMAX_VIPS=%d" % MAX_VIPS,
            "-DMAX_SOURCES=%d" % MAX_SOURCES]


def _build_file(root):
    """Where the build id of the pinned program is kept: beside the pins
    would be bpffs, which takes no plain files; /run goes with it at boot."""
    return "/run/xvs/decap-%s.build" % hashlib.sha256(root.encode()).hexdigest()[:16]


def _u32(n):
    return bytes(L.U32(n))


def _want_maps(cfg):
    config = Config(ipip=1 if "ipip" in cfg["decap"] else 0, check_sources=1 if cfg["sources"] else 0,
                    gue_port=L.be16(cfg["gue_port"]) if cfg["gue_port"] else 0)
    out = {"config": bytes(config)}
    for name in ("vips", "sources"):
        out[name] = set(_u32(L.be32(a)) for a in cfg[name] if ":" not in a)
        out[name + "6"] = set(bytes(L.addr6(a)) for a in cfg[name] if ":" in a)
    return out


def _read_maps(root):
    with _bpf.Map(os.path.join(root, "config")) as m:
        config = m.lookup(_u32(0))
    out = {"config": config}
    for name in SETS:
        with _bpf.Map(os.path.join(root, name)) as m:
            out[name] = set(m.keys())
    return out


def _write_maps(root, want, have):
    with _bpf.Map(os.path.join(root, "config")) as m:
        m.update(_u32(0), want["config"])
    for name in SETS:
        with _bpf.Map(os.path.join(root, name)) as m:
            for k in want[name] - have.get(name, set()):
                m.update(k, b"\1")
            for k in have.get(name, set()) - want[name]:
                m.delete(k)


def counters(root):
    """{name: packets} summed over CPUs, or None when nothing is pinned."""
    path = os.path.join(root, "counters")
    if not os.path.exists(path):
        return None
    out = {}
    with _bpf.Map(path) as m:
        for i, name in enumerate(COUNTERS):
            out[name] = sum(int.from_bytes(v, sys.byteorder) for v in m.per_cpu(m.lookup(_u32(i))))
    return out


class DecapPlan(object):
    """What making the decapsulator match cfg takes; apply() does it."""

    def __init__(self, cfg, text):
        self.cfg, self.text, self.root = cfg, text, cfg["bpffs"]
        self.build = build_id(text, self.root)
        prog_id = _loader.pinned_prog_id(self.root)
        have_build = None
        if prog_id and os.path.exists(_build_file(self.root)):
            with open(_build_file(self.root)) as f:
                have_build = f.read().strip()
        self.load = prog_id is None or have_build != self.build
        self.attached = _netinfo.xdp_interfaces(prog_id) if prog_id else {}
        self.want = _want_maps(cfg)
        self.have = {} if self.load else _read_maps(self.root)
        self.attach = [n for n in cfg["interfaces"] if n not in self.attached
                       or cfg["mode"] not in ("auto", self.attached[n])]
        for name in cfg["interfaces"]:
            info = _netinfo.interface(name)
            if name not in self.attached and info["xdp_prog_id"]:
                raise XvsError("interfaces: %s runs another XDP program (id %d); detach it first"
                               % (name, info["xdp_prog_id"]))
        self.detach = sorted(n for n in self.attached if n not in cfg["interfaces"])
        self.changed = bool(self.load or self.attach or self.detach or self.want != self.have)

    def apply(self):
        if self.load:
            self.load_program()
        elif self.want != self.have:
            _write_maps(self.root, self.want, self.have)
        fd = _bpf.obj_get(os.path.join(self.root, _loader.PROG_PIN))
        try:
            for name in (self.cfg["interfaces"] if self.load else self.attach):
                mode = self.cfg["mode"] if self.cfg["mode"] != "auto" else self.attached.get(name, "auto")
                self.attached[name] = _loader.attach_fd(fd, ENTRY, name, mode)
        finally:
            os.close(fd)
        for name in self.detach:
            _loader.detach(name)
            self.attached.pop(name, None)

    def load_program(self):
        """A new build: fresh maps, filled before the program is pinned
        and swapped in (the running one keeps its own maps until then)."""
        _loader.check_bpffs(self.root)
        for name in MAPS:
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                os.unlink(path)
        from bcc import BPF  # only here: reading state must not need a compiler
        try:
            b = BPF(text=self.text.encode(), cflags=cflags(self.root))
            fn = b.load_func(ENTRY.encode(), BPF.XDP)
        except Exception as e:
            raise XvsError("compiling or loading the decapsulating program failed: %s" % e)
        try:
            _write_maps(self.root, self.want, {})
            _loader.pin_program(fn.fd, self.root)
            _state.replace_file(_build_file(self.root), self.build.encode())
        finally:
            b.cleanup()

    def result(self):
        return {"interfaces": dict(sorted(self.attached.items())), "bpffs": self.root,
                "counters": counters(self.root)}


def remove(root, config_file=None):
    """Detach the pinned program wherever it runs and unpin everything;
    True when anything was there."""
    prog_id = _loader.pinned_prog_id(root)
    changed = False
    if prog_id:
        for name in _netinfo.xdp_interfaces(prog_id):
            _loader.detach(name)
        changed = True
    for name in MAPS + (_loader.PROG_PIN,):
        path = os.path.join(root, name)
        if os.path.exists(path):
            os.unlink(path)
            changed = True
    for path in (_build_file(root), config_file):
        if path and os.path.exists(path):
            os.unlink(path)
            changed = True
    if os.path.isdir(root):
        os.rmdir(root)
    return changed


def config_bytes(cfg):
    """The boot file's content for cfg."""
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def program(library):
    """files/xdp_decap.c from the boot restore's library zip."""
    try:
        with zipfile.ZipFile(library) as z:
            return z.read(LIBRARY_PROGRAM).decode()
    except (KeyError, IOError, OSError, zipfile.BadZipFile) as e:
        raise XvsError("library=%s: no decapsulating program in it (%s)" % (library, e))


def main(library, argv):
    """The boot restore: python3 xvs-decap [CONFIG_FILE]; exit 1 with one
    line on stderr when it cannot be applied."""
    path = argv[0] if argv else DEFAULT_CONFIG_FILE
    try:
        try:
            with open(path) as f:
                cfg = normalise(json.load(f))
        except (IOError, OSError, ValueError) as e:
            raise XvsError("%s: %s" % (path, e))
        with _state.host_lock():
            plan = DecapPlan(cfg, program(library))
            plan.apply()
        sys.stdout.write("xvs-decap: %s on %s\n" % (" and ".join(cfg["decap"]), ", ".join(
            "%s (%s)" % kv for kv in sorted(plan.result()["interfaces"].items()))))
    except (XvsError, _loader.LoaderError, _bpf.BpfError, _netinfo.NetInfoError) as e:
        sys.stderr.write("xvs-decap: %s\n" % e)
        return 1
    return 0
