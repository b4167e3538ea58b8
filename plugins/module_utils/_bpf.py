# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The bpf(2) system call over ctypes.

Why by hand: reading and writing pinned maps must work without a compiler
and without importing bcc (which links LLVM and takes a noticeable time to
import), and neither pyroute2 nor the Python standard library wraps bpf(2).
Only the commands the control plane needs are here; each wraps one
``union bpf_attr`` member from include/uapi/linux/bpf.h and turns errno into
a BpfError that names the operation and the object.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import errno
import os
import struct

from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

# enum bpf_cmd
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
PROG_TEST_RUN = 10
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26

# enum bpf_map_type: the types the programs declare, and those whose
# values are per CPU
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY = 1, 2, 5, 6
MAP_LRU_HASH, MAP_LRU_PERCPU_HASH, MAP_DEVMAP = 9, 10, 14
PERCPU_MAP_TYPES = frozenset((MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH))
ARRAY_MAP_TYPES = frozenset((MAP_ARRAY, MAP_PERCPU_ARRAY))

ANY = 0                   # BPF_ANY: an update creates or replaces

# EINVAL, ENOTSUPP (524, kernel-internal) and EOPNOTSUPP: no batch ops here.
_NO_BATCH = (errno.EINVAL, 524, errno.EOPNOTSUPP)

_ATTR_SIZE = 128  # larger than every member we use; the kernel accepts zero tail


class BpfError(XvsError, OSError):
    """A bpf(2) call failed; the message names what was being done."""

    def __init__(self, err, what):
        OSError.__init__(self, err, "%s: %s" % (what, os.strerror(err)))
        self.what = what


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr():
    machine = os.uname()[4]
    if machine not in _SYS_BPF:
        raise BpfError(errno.ENOSYS, "bpf(2) on %s" % machine)
    return _SYS_BPF[machine]


def _addr(buf):
    return ctypes.addressof(buf) if buf is not None else 0


def bpf(cmd, fmt, values, what):
    """Run one bpf(2) command with an attr packed from fmt/values.

    Returns (result, attr buffer) so callers can read fields the kernel
    writes back (test run results, batch counts).
    """
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    res = _libc.syscall(_nr(), cmd, attr, _ATTR_SIZE)
    if res < 0:
        raise BpfError(ctypes.get_errno(), what)
    return res, attr


def possible_cpus():
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, dummy, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def obj_get(path):
    data = ctypes.create_string_buffer(os.fsencode(path))
    fd = bpf(OBJ_GET, "=QII", (_addr(data), 0, 0), "open pinned object %s" % path)[0]
    return fd


def obj_pin(fd, path):
    data = ctypes.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, "=QII", (_addr(data), fd, 0), "pin object at %s" % path)


class MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 64)]


class ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", ctypes.c_uint32),
                ("xlated_prog_len", ctypes.c_uint32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16),
                ("_rest", ctypes.c_uint8 * 128)]


def obj_info(fd, info_type):
    info = info_type()
    bpf(OBJ_GET_INFO_BY_FD, "=IIQ", (fd, ctypes.sizeof(info), ctypes.addressof(info)),
        "read info of bpf object fd %d" % fd)
    return info


def prog_info(fd):
    info = obj_info(fd, ProgInfo)
    return {"id": info.id, "tag": bytes(info.tag).hex(), "type": info.type,
            "name": info.name.decode(errors="replace"),
            "xlated_len": info.xlated_prog_len, "jited_len": info.jited_prog_len}


def prog_test_run(fd, data, ctx=b"", repeat=1, out_size=None):
    """BPF_PROG_TEST_RUN: returns (verdict, output bytes, duration ns)."""
    out_size = out_size or len(data) + 256
    din = ctypes.create_string_buffer(bytes(data), len(data))
    dout = ctypes.create_string_buffer(out_size)
    cin = ctypes.create_string_buffer(bytes(ctx), len(ctx)) if ctx else None
    attr = bpf(PROG_TEST_RUN, "=IIIIQQIIIIQQ",
               (fd, 0, len(data), out_size, _addr(din), _addr(dout), repeat, 0,
                len(ctx), 0, _addr(cin), 0),
               "test run of program fd %d" % fd)[1]
    retval, size_out = struct.unpack_from("=I4xI", attr, 4)
    duration = struct.unpack_from("=I", attr, 36)[0]
    return retval, dout.raw[:size_out], duration


class Map(object):
    """A BPF map opened from a pin, with raw-bytes access.

    Per-CPU maps take and return the concatenation of one value per
    possible CPU, each padded to 8 bytes, as the kernel does.
    """

    def __init__(self, path):
        self.path = path
        self.fd = obj_get(path)
        try:
            info = obj_info(self.fd, MapInfo)
        except BpfError:
            os.close(self.fd)
            raise
        self.type = info.type
        self.id = info.id
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.percpu = info.type in PERCPU_MAP_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        self.stride = (info.value_size + 7) // 8 * 8 if self.percpu else info.value_size
        self.buf_size = self.stride * self.ncpus

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _what(self, op):
        return "%s %s" % (op, self.path)

    def _check(self, blob, size, name):
        if len(blob) != size:
            raise ValueError("%s: %s is %d bytes, the map wants %d"
                             % (self.path, name, len(blob), size))
        return ctypes.create_string_buffer(bytes(blob), size)

    def lookup(self, key):
        """Value bytes, or None when the key is absent."""
        k = self._check(key, self.key_size, "key")
        v = ctypes.create_string_buffer(self.buf_size)
        try:
            bpf(MAP_LOOKUP_ELEM, "=IIQQQ", (self.fd, 0, _addr(k), _addr(v), 0),
                self._what("look up in"))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def update(self, key, value, flags=ANY):
        k = self._check(key, self.key_size, "key")
        v = self._check(value, self.buf_size, "value")
        bpf(MAP_UPDATE_ELEM, "=IIQQQ", (self.fd, 0, _addr(k), _addr(v), flags),
            self._what("update"))

    def delete(self, key):
        """Delete key; False when it was not there."""
        k = self._check(key, self.key_size, "key")
        try:
            bpf(MAP_DELETE_ELEM, "=IIQQQ", (self.fd, 0, _addr(k), 0, 0), self._what("delete from"))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self):
        """Every key (a snapshot walk with GET_NEXT_KEY)."""
        out = []
        nxt = ctypes.create_string_buffer(self.key_size)
        cur = None
        while True:
            try:
                bpf(MAP_GET_NEXT_KEY, "=IIQQQ", (self.fd, 0, _addr(cur), _addr(nxt), 0),
                    self._what("walk"))
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def items(self):
        """Every (key, value) pair; keys deleted during the walk are skipped."""
        result = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                result.append((k, v))
        return result

    def update_batch(self, keys, values, flags=ANY):
        """Write many elements in one system call (kernel 5.6+), falling
        back to one call per element where the map type lacks batch ops.
        keys and values: lists of bytes, or each already joined into one
        bytes object (what a caller that builds a whole table at once has)."""
        n = len(keys) if isinstance(keys, list) else len(keys) // self.key_size
        if n == 0:
            return
        kb = self._check(b"".join(keys) if isinstance(keys, list) else bytes(keys),
                         self.key_size * n, "keys")
        vb = self._check(b"".join(values) if isinstance(values, list) else bytes(values),
                         self.buf_size * n, "values")
        try:
            bpf(MAP_UPDATE_BATCH, "=QQQQIIQQ",
                (0, 0, _addr(kb), _addr(vb), n, self.fd, flags, 0), self._what("batch update"))
        except BpfError as e:
            if e.errno not in _NO_BATCH:
                raise
            for i in range(n):
                self.update(kb[i * self.key_size:(i + 1) * self.key_size],
                            vb[i * self.buf_size:(i + 1) * self.buf_size], flags)

    def lookup_range(self, start, count):
        """Values of the array keys start .. start+count-1, one bytes
        object each (see read_range)."""
        raw = self.read_range(start, count)
        return [raw[i * self.buf_size:(i + 1) * self.buf_size] for i in range(count)]

    def read_range(self, start, count):
        """Values of the array keys start .. start+count-1 back to back, in
        one BPF_MAP_LOOKUP_BATCH: an array's batch token is the key before
        the first one wanted.  One system call instead of count lookups is
        what keeps reading a service's destinations and Maglev table cheap
        with a thousand services; one bytes object instead of count keeps
        a scrape's reading of every Maglev table (4,097 chunks each) cheap."""
        vb = ctypes.create_string_buffer(self.buf_size * count)
        kb = ctypes.create_string_buffer(self.key_size * count)
        token_in = ctypes.create_string_buffer(struct.pack("=I", start - 1), 4) if start else None
        token_out = ctypes.create_string_buffer(4)
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("=QQQQIIQQ", attr, 0, _addr(token_in), _addr(token_out),
                         _addr(kb), _addr(vb), count, self.fd, 0, 0)
        res = _libc.syscall(_nr(), MAP_LOOKUP_BATCH, attr, _ATTR_SIZE)
        err = ctypes.get_errno() if res < 0 else 0
        if err in _NO_BATCH:
            return b"".join(self.lookup(struct.pack("=I", k)) for k in range(start, start + count))
        n = struct.unpack_from("=I", attr, 32)[0]
        if err not in (0, errno.ENOENT) or n != count:
            raise BpfError(err or errno.EIO, self._what("read keys %d-%d of" % (start, start + count - 1)))
        return vb.raw

    def batches(self, chunk=4096):
        """(keys, values, n) per BPF_MAP_LOOKUP_BATCH call: n elements,
        their keys and values packed back to back (values of buf_size), so
        a reader of a million flows can slice columns out of them in C
        (bytes slicing, struct.iter_unpack) instead of building a million
        pairs; None where the map type has no batch operations."""
        kb = ctypes.create_string_buffer(self.key_size * chunk)
        vb = ctypes.create_string_buffer(self.buf_size * chunk)
        token_in = None
        token_out = ctypes.create_string_buffer(max(self.key_size, 8))
        while True:
            attr = ctypes.create_string_buffer(_ATTR_SIZE)
            struct.pack_into("=QQQQIIQQ", attr, 0, _addr(token_in), _addr(token_out),
                             _addr(kb), _addr(vb), chunk, self.fd, 0, 0)
            res = _libc.syscall(_nr(), MAP_LOOKUP_BATCH, attr, _ATTR_SIZE)
            err = ctypes.get_errno() if res < 0 else 0
            if err in _NO_BATCH and token_in is None:
                yield None
                return
            if err not in (0, errno.ENOENT):
                raise BpfError(err, self._what("batch read"))
            # On ENOENT (the end) the kernel still reports the last count.
            n = struct.unpack_from("=I", attr, 32)[0]
            yield kb.raw[:n * self.key_size], vb.raw[:n * self.buf_size], n
            if err == errno.ENOENT:
                return
            token_in = ctypes.create_string_buffer(token_out.raw, len(token_out.raw))

    def lookup_batch(self, chunk=4096):
        """Every (key, value) pair, chunk elements per system call with
        BPF_MAP_LOOKUP_BATCH; a key walk where the map type lacks it."""
        result = []
        for batch in self.batches(chunk):
            if batch is None:
                return self.items()
            keys, values, n = batch
            result.extend((keys[i * self.key_size:(i + 1) * self.key_size],
                           values[i * self.buf_size:(i + 1) * self.buf_size]) for i in range(n))
        return result

    def per_cpu(self, value):
        """Split a per-CPU value into one bytes object per CPU."""
        return [value[i * self.stride:i * self.stride + self.value_size]
                for i in range(self.ncpus)]

    def pack_all_cpus(self, value):
        """The same value on every CPU, in the kernel's per-CPU layout."""
        pad = b"\0" * (self.stride - len(value))
        return (bytes(value) + pad) * self.ncpus
