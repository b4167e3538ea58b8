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

import contextlib
import ctypes
import errno
import hashlib
import os

from ansible_collections.xvs.lb.plugins.module_utils import _bpf, _layout as L, _netinfo, _spec
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, abi_refusal, check_map, pinned_abi
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

BPF_FS_MAGIC = 0xCAFE4A11
PROG_PIN = "prog"
ENTRY = "xdp_lb"
# XDP_FLAGS_* from include/uapi/linux/if_link.h
XDP_FLAGS = {"generic": 1 << 1, "native": 1 << 2}
MODES = ("auto", "native", "generic")


class LoaderError(XvsError):
    pass


def default_source(name="xdp_lb.c"):
    """files/<name> of this collection (in a checkout or on the
    controller): the balancer's program, or the realservers' (xdp_decap.c)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "files", name))


def read_source(source=None):
    return read_source_bytes(source).decode()


def read_source_bytes(source=None):
    source = source or default_source()
    try:
        with open(source, "rb") as f:
            return f.read()
    except (IOError, OSError) as e:
        raise LoaderError("source=%s: %s" % (source, e.strerror))


def check_bpffs(root, create=True):
    """root must be a directory on a bpf filesystem (made if missing and
    create)."""
    parent = root if os.path.isdir(root) else os.path.dirname(root.rstrip("/"))
    if not _is_bpffs(parent):
        raise LoaderError("bpffs=%s: %s is not on a mounted bpf filesystem (mount -t bpf bpf %s)"
                          % (root, parent, parent))
    if create and not os.path.isdir(root):
        os.mkdir(root, 0o700)


def _is_bpffs(path):
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_long * 15)]
    libc = ctypes.CDLL(None, use_errno=True)
    buf = StatFs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def cflags(root, sizes):
    flags = ['-DXVS_PIN_ROOT="%s"' % root]
    for name, (_d, _lo, _hi, macro) in sorted(L.SIZE_LIMITS.items()):
        flags.append("-D%s=%d" % (macro, int(sizes[name])))
    return flags


def build_id(text, root, sizes):
    """What identifies a build: the program text and every -D option.
    Equal ids mean reloading would change nothing."""
    h = hashlib.sha256(text.encode())
    h.update("\0".join(cflags(root, sizes)).encode())
    return h.hexdigest()[:32]


def check_pins(root, sizes):
    """Compare every pinned map with what a program of these sizes declares.

    A different type or key/value size means another program version:
    refused here.  Returns the names of the maps whose max_entries differ
    (the sizes changed).
    """
    abi = pinned_abi(root)
    if abi not in (None, L.ABI_VERSION):
        raise LoaderError(abi_refusal(root, abi))
    entries = L.map_entries(sizes)
    resized = []
    for name, (mtype, key, value) in L.MAPS.items():
        path = os.path.join(root, name)
        if not os.path.exists(path):
            continue
        with _bpf.Map(path) as m:
            check_map(m, name, mtype, key, value)
            if m.max_entries != entries[name]:
                resized.append(name)
    return resized


def resize_refusal(resized, sizes, current):
    """Why a resize is refused: the changed sizes (as option=value), the
    maps they re-create, and what allowing it costs."""
    changed = ", ".join("%s=%d (now %d)" % (k, sizes[k], current[k]) for k in sorted(sizes)
                        if current.get(k) != sizes[k])
    return ("%s: changes the pinned %s map%s; a reload with new sizes re-creates the maps, so every "
            "live flow re-selects its destination (and counters restart): allow the flow table "
            "reset explicitly to do it" % (changed, ", ".join(resized), "s" if len(resized) > 1 else ""))


def pinned_sizes(root):
    """The sizes the pinned maps were made with, from their meta map."""
    with DataPlane(root) as dp:
        meta = dp.meta
    return dict((name, getattr(meta, name)) for name in L.SIZE_LIMITS)


def _snapshot(root, sizes):
    """The configuration to carry into maps of new sizes; refuses sizes
    the current configuration does not fit in."""
    with DataPlane(root) as dp:
        services = dp.services()
        ports = dp.maps["tx_ports"].items()
        vlans = dp.read_vlans()
        tunnel_source = dp.read_tunnel_source()
    if len(services) > sizes["max_services"]:
        raise LoaderError("max_services=%d: %d services are configured"
                          % (sizes["max_services"], len(services)))
    for s in services:
        if len(s["destinations"]) > sizes["max_destinations"]:
            raise LoaderError("max_destinations=%d: service %s:%d/%s has %d destinations"
                              % (sizes["max_destinations"], s["address"], s["port"],
                                 s["protocol"], len(s["destinations"])))
    for k, dummy in ports:
        if int.from_bytes(k, "little") >= sizes["max_interfaces"]:
            raise LoaderError("max_interfaces=%d: redirect slot %d is in use"
                              % (sizes["max_interfaces"], int.from_bytes(k, "little")))
    return services, ports, vlans, tunnel_source


def load(root, sizes=None, source=None, allow_flow_reset=False, text=None):
    """Compile and load the program with its maps pinned under root.

    Where the pins exist with other sizes, the maps are re-created and the
    configuration copied over, only with allow_flow_reset (live flows and
    counters do not survive that).  Returns a Program: maps and program
    pinned, nothing attached yet.
    """
    sizes = L.sizes(**(sizes or {}))
    root = _spec.bpffs(root)
    text = text if text is not None else read_source(source)
    check_bpffs(root)
    resized = check_pins(root, sizes)
    snapshot = None
    if resized:
        if not allow_flow_reset:
            raise LoaderError(resize_refusal(resized, sizes, pinned_sizes(root)))
        snapshot = _snapshot(root, sizes)
        for name in L.MAPS:
            if os.path.exists(os.path.join(root, name)):
                os.unlink(os.path.join(root, name))

    from bcc import BPF  # only here: reading state must not need a compiler
    try:
        b = BPF(text=text.encode(), cflags=cflags(root, sizes))
        fn = b.load_func(ENTRY.encode(), BPF.XDP)
    except Exception as e:
        raise LoaderError("compiling or loading %s failed: %s" % (source or "the program", e))
    meta = L.Meta(abi_version=L.ABI_VERSION, **sizes)
    meta.build_id[:] = [int(build_id(text, root, sizes)[i:i + 8], 16) for i in range(0, 32, 8)]
    with _bpf.Map(os.path.join(root, "meta")) as m:
        m.update(bytes(L.U32(0)), bytes(meta))
    if snapshot:
        _carry_over(root, *snapshot)
    pin_program(fn.fd, root)
    return Program(root, fn.fd, b)


def pin_program(fd, root):
    """Pin the program fd at root/prog, replacing the one pinned there
    atomically (a new pin renamed over the old one)."""
    pin = os.path.join(root, PROG_PIN)
    tmp = pin + "_new"  # bpffs reserves names with dots
    if os.path.exists(tmp):
        os.unlink(tmp)
    _bpf.obj_pin(fd, tmp)
    os.rename(tmp, pin)


def _carry_over(root, services, ports, vlans, tunnel_source):
    """Write into maps made with new sizes the configuration _snapshot()
    read from the old ones."""
    with DataPlane(root) as dp:
        for k, v in ports:
            dp.maps["tx_ports"].update(k, v)
        dp.write_vlans(vlans)
        dp.write_tunnel_source(tunnel_source)
        for s in services:
            dp.set_service(s["address"], s["port"], s["protocol"], s["sticky"], s["destinations"],
                           s["forwarding"])


class Program(object):
    """A loaded program: from load(), or the pinned one (open_pinned)."""

    def __init__(self, root, fd, bpf=None):
        self.root = root
        self.fd = fd
        self.bpf = bpf
        self.info = _bpf.prog_info(fd)

    def close(self):
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_pinned(root):
    path = os.path.join(root, PROG_PIN)
    if not os.path.exists(path):
        raise LoaderError("no program is pinned at %s" % path)
    return Program(root, _bpf.obj_get(path))


def pinned_prog_id(root):
    """The kernel's id of the program pinned at root/prog, or None."""
    if not os.path.exists(os.path.join(root, PROG_PIN)):
        return None
    with open_pinned(root) as p:
        return p.info["id"]


def attach(prog, ifname, mode="auto"):
    """Attach prog to ifname in native, generic or auto mode (native where
    the driver supports it, else generic).  Replaces whatever XDP program
    is there atomically.  Returns the mode used."""
    m = attach_fd(prog.fd, ENTRY, ifname, mode)
    _set_tx_port(prog.root, _netinfo.interface(ifname)["index"])
    return m


def attach_fd(fd, entry, ifname, mode="auto"):
    """attach() for any XDP program: fd, its function name entry."""
    if mode not in MODES:
        raise LoaderError("mode=%s: must be one of %s" % (mode, ", ".join(MODES)))
    info = _netinfo.interface(ifname)
    if info["xdp_mode"] and mode == "auto":
        mode = info["xdp_mode"]
    elif info["xdp_mode"] and info["xdp_mode"] != mode:
        detach(ifname)   # the kernel refuses to switch modes in place
    from bcc import BPF
    tried = ["native", "generic"] if mode == "auto" else [mode]
    last = None
    for m in tried:
        try:
            BPF.attach_xdp(ifname.encode(), BPF.Function(None, entry.encode(), fd), XDP_FLAGS[m])
        except Exception as e:  # bcc raises a bare Exception
            last = e
            continue
        return m
    raise LoaderError("cannot attach XDP to %s in %s mode: %s" % (ifname, " or ".join(tried), last))


def detach(ifname, root=None):
    """Remove whatever XDP program is attached to ifname (and its redirect
    slot under root); False if none was attached."""
    info = _netinfo.interface(ifname)
    if root and os.path.exists(os.path.join(root, "tx_ports")):
        with _bpf.Map(os.path.join(root, "tx_ports")) as m:
            for k, v in m.items():
                if int.from_bytes(v[:4], "little") == info["index"]:
                    m.delete(k)
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
        # a devmap walk lists every index; only the ones holding a device are used
        used = set(int.from_bytes(kv[0], "little") for kv in m.items())
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


def attached(root, interfaces=None):
    """{ifname: mode} of the interfaces (all, by default) running the
    pinned program."""
    prog_id = pinned_prog_id(root)
    if not prog_id:
        return {}
    found = _netinfo.xdp_interfaces(prog_id)
    if interfaces is not None:
        found = dict((k, v) for k, v in found.items() if k in interfaces)
    return found


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


def is_pinned(root):
    """Whether a program and its maps are pinned at root."""
    return os.path.exists(os.path.join(root, "meta")) and os.path.exists(os.path.join(root, PROG_PIN))


def status(root):
    """The pinned program and its attachment, or None when nothing is pinned.
    Reads only: no compiler involved."""
    if not is_pinned(root):
        return None
    with DataPlane(root) as dp:
        meta = dp.meta
        vlans = dp.read_vlans()
        tunnel_source = dp.read_tunnel_source()
    with open_pinned(root) as p:
        info = p.info
    sizes = pinned_sizes(root)
    return {"program": {"id": info["id"], "tag": info["tag"], "name": info["name"]},
            "build_id": "".join("%08x" % w for w in meta.build_id),
            "interfaces": _netinfo.xdp_interfaces(info["id"]),
            "sizes": sizes, "vlans": vlans, "tunnel_source": tunnel_source, "bpffs": root}


UPGRADE_ASIDE = "before_upgrade"    # where a layout upgrade keeps the old pins (bpffs names take no dots)


@contextlib.contextmanager
def layout_upgrade(root, interfaces):
    """Set the pins of another data-plane layout aside for the block, which
    loads, fills and attaches the new program under root.  The old program
    serves meanwhile (an attached program holds its maps).  When the block
    fails, its pins are removed and the old ones put back and re-attached
    to interfaces ({name: mode}); when it succeeds, the old ones go."""
    aside = os.path.join(root, UPGRADE_ASIDE)
    if os.path.exists(aside):
        raise LoaderError("%s is left from a layout upgrade that did not finish: check what %s holds, "
                          "remove it and run again" % (aside, root))
    os.mkdir(aside)
    old = [n for n in os.listdir(root) if n != UPGRADE_ASIDE]
    for name in old:
        os.rename(os.path.join(root, name), os.path.join(aside, name))
    try:
        yield
    except BaseException:
        for name in os.listdir(root):
            if name != UPGRADE_ASIDE:
                os.unlink(os.path.join(root, name))
        for name in old:
            os.rename(os.path.join(aside, name), os.path.join(root, name))
        os.rmdir(aside)
        with open_pinned(root) as prog:
            for name, mode in sorted(interfaces.items()):
                attach_fd(prog.fd, ENTRY, name, mode)
        raise
    for name in old:
        os.unlink(os.path.join(aside, name))
    os.rmdir(aside)


def unpin_all(root):
    """Remove every pin under root (the maps go when nothing holds them)."""
    for name in list(L.MAPS) + [PROG_PIN, PROG_PIN + "_new"]:
        path = os.path.join(root, name)
        if os.path.exists(path):
            os.unlink(path)
    try:
        os.rmdir(root)
    except OSError:
        pass
