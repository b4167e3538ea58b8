# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Compile, load, pin, attach, detach and reload the XDP program with bcc.

bcc's BPF_TABLE_PINNED opens a map that is already pinned instead of
creating it, which is what keeps services, destinations, counters and live
flows across a reload.  It does not compare the pinned map's shape with
the one the program declares, so check_pins() does that first, against
_layout, and refuses what would corrupt state.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import errno
import os

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _layout as L, _netinfo
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, check_map

BPF_FS_MAGIC = 0xCAFE4A11
PROG_PIN = "prog"
ENTRY = "xdp_lb"
# XDP_FLAGS_* from include/uapi/linux/if_link.h
XDP_FLAGS = {"generic": 1 << 1, "native": 1 << 2}


class LoaderError(Exception):
    pass


def default_source():
    """files/xdp_lb.c of this collection."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "files", "xdp_lb.c"))


def check_bpffs(root):
    """root must be a directory on a bpf filesystem (created if missing)."""
    if not os.path.isabs(root):
        raise LoaderError("bpffs=%s: must be an absolute path" % root)
    parent = root if os.path.isdir(root) else os.path.dirname(root.rstrip("/"))
    if not _is_bpffs(parent):
        raise LoaderError("bpffs=%s: %s is not on a mounted bpf filesystem (mount -t bpf bpf %s)"
                          % (root, parent, parent))
    if not os.path.isdir(root):
        os.mkdir(root, 0o700)


def _is_bpffs(path):
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_long * 15)]
    libc = ctypes.CDLL(None, use_errno=True)
    buf = StatFs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def check_pins(root, sizes, allow_flow_reset=False):
    """Compare every pinned map with what a program of these sizes declares.

    A different type or key/value size means another program version:
    refused.  A different max_entries means other sizes: the flow table may
    be dropped (its flows re-select) when allow_flow_reset; resizing the
    configuration maps is refused.  Returns the maps to unpin.
    """
    entries = L.map_entries(sizes)
    unpin = []
    for name, (mtype, key, value) in L.MAPS.items():
        path = os.path.join(root, name)
        if not os.path.exists(path):
            continue
        m = _bpf.Map(path)
        try:
            check_map(m, name, mtype, key, value)
            if m.max_entries != entries[name]:
                if name == "flows" and allow_flow_reset:
                    unpin.append(path)
                else:
                    raise LoaderError(
                        "the pinned %s map holds %d entries but the requested sizes need %d: "
                        "changing it would lose %s; %s"
                        % (name, m.max_entries, entries[name],
                           "every live flow" if name == "flows" else "the configuration",
                           "allow the flow table reset explicitly" if name == "flows"
                           else "detach (removing the pins) and attach again"))
        finally:
            m.close()
    return unpin


def cflags(root, sizes):
    flags = ['-DXVS_PIN_ROOT="%s"' % root]
    for name, (_d, _lo, _hi, macro) in sorted(L.SIZE_LIMITS.items()):
        flags.append("-D%s=%d" % (macro, int(sizes[name])))
    return flags


def load(root, sizes=None, source=None, allow_flow_reset=False):
    """Compile and load the program with its maps pinned under root.

    Returns a Program; the maps are pinned, the program is pinned at
    root/prog, nothing is attached yet.
    """
    sizes = L.sizes(**(sizes or {}))
    root = root.rstrip("/") or "/"
    if '"' in root or "\\" in root or not root.startswith("/"):
        raise LoaderError("bpffs=%s: must be an absolute path without quotes or backslashes" % root)
    source = source or default_source()
    try:
        with open(source) as f:
            text = f.read()
    except OSError as e:
        raise LoaderError("source=%s: %s" % (source, e.strerror))
    check_bpffs(root)
    for path in check_pins(root, sizes, allow_flow_reset):
        os.unlink(path)

    from bcc import BPF  # only here: reading state must not need a compiler
    try:
        b = BPF(text=text.encode(), cflags=cflags(root, sizes))
        fn = b.load_func(ENTRY.encode(), BPF.XDP)
    except Exception as e:
        raise LoaderError("compiling or loading %s failed: %s" % (source, e))
    meta = L.Meta(abi_version=L.ABI_VERSION, max_services=sizes["max_services"],
                  max_dests=sizes["max_destinations"], maglev_size=sizes["maglev_table_size"],
                  flow_table_size=sizes["flow_table_size"], tcp_timeout=sizes["tcp_timeout"],
                  udp_timeout=sizes["udp_timeout"], max_ifaces=sizes["max_interfaces"])
    with _bpf.Map(os.path.join(root, "meta")) as m:
        m.update(bytes(L.U32(0)), bytes(meta))
    pin = os.path.join(root, PROG_PIN)
    tmp = pin + "_new"  # bpffs reserves names with dots
    if os.path.exists(tmp):
        os.unlink(tmp)
    _bpf.obj_pin(fn.fd, tmp)
    os.rename(tmp, pin)      # the pinned program is replaced atomically
    return Program(root, b, fn, sizes)


class Program(object):
    def __init__(self, root, bpf, fn, sizes):
        self.root = root
        self.bpf = bpf
        self.fn = fn
        self.fd = fn.fd
        self.sizes = sizes
        self.info = _bpf.prog_info(self.fd)

    def close(self):
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def pinned_prog_id(root):
    path = os.path.join(root, PROG_PIN)
    if not os.path.exists(path):
        return None
    fd = _bpf.obj_get(path)
    try:
        return _bpf.prog_info(fd)["id"]
    finally:
        os.close(fd)


def attach(prog, ifname, mode="auto"):
    """Attach prog to ifname in native, generic or auto mode (native where
    the driver supports it, else generic).  Replaces whatever XDP program
    is there atomically.  Returns the mode used."""
    if mode not in ("auto", "native", "generic"):
        raise LoaderError("mode=%s: must be auto, native or generic" % mode)
    info = _netinfo.interface(ifname)
    if info["xdp_mode"] and mode != "auto" and info["xdp_mode"] != mode:
        # the kernel refuses to switch modes in place
        detach(ifname)
    elif info["xdp_mode"] and mode == "auto":
        mode = info["xdp_mode"]
    from bcc import BPF
    tried = ["native", "generic"] if mode == "auto" else [mode]
    last = None
    for m in tried:
        try:
            BPF.attach_xdp(ifname.encode(), prog.fn, XDP_FLAGS[m])
        except Exception as e:  # bcc raises a bare Exception
            last = e
            continue
        _set_tx_port(prog.root, info["index"])
        return m
    raise LoaderError("cannot attach XDP to %s in %s mode: %s" % (ifname, "/".join(tried), last))


def detach(ifname):
    """Remove whatever XDP program is attached to ifname; False if none."""
    info = _netinfo.interface(ifname)
    if not info["xdp_mode"]:
        return False
    from bcc import BPF
    BPF.remove_xdp(ifname.encode(), XDP_FLAGS.get(info["xdp_mode"], 0))
    return True


def _set_tx_port(root, ifindex):
    with DataPlane(root) as dp:
        if dp.tx_port(ifindex) is not None:
            return
        m = dp.maps["tx_ports"]
        used = {int.from_bytes(k, "little") for k, _ in m.items()}
        free = [i for i in range(m.max_entries) if i not in used]
        if not free:
            raise LoaderError("all max_interfaces=%d redirect slots are in use" % m.max_entries)
        try:
            m.update(bytes(L.U32(free[0])), bytes(L.U32(ifindex)))
        except _bpf.BpfError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            # a device without ndo_xdp_xmit cannot be a redirect target;
            # XDP_TX out of its ingress still works


def attached(root, interfaces):
    """{ifname: mode} of the given interfaces running the pinned program."""
    prog_id = pinned_prog_id(root)
    out = {}
    for name in interfaces:
        info = _netinfo.interface(name)
        if prog_id and info["xdp_prog_id"] == prog_id:
            out[name] = info["xdp_mode"]
    return out


def reload(root, interfaces, sizes=None, source=None, allow_flow_reset=False):
    """Load a (new) program over the same pins and swap it in on each of
    interfaces in the mode it already runs in.  Returns (Program, modes)."""
    modes = {}
    for name in interfaces:
        modes[name] = _netinfo.interface(name)["xdp_mode"] or "auto"
    prog = load(root, sizes, source, allow_flow_reset)
    for name, mode in modes.items():
        modes[name] = attach(prog, name, mode)
    return prog, modes


def unpin_all(root):
    """Remove every pin under root (the maps go when nothing holds them)."""
    for name in list(L.MAPS) + [PROG_PIN]:
        path = os.path.join(root, name)
        if os.path.exists(path):
            os.unlink(path)
    try:
        os.rmdir(root)
    except OSError:
        pass
