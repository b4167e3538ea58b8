# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host's two files: the lock that serialises xvs.lb runs, and the
state of record, the desired state every changing run writes and the boot
restore applies.

The record (JSON, mode 0600 in a 0700 directory, written to a temporary
file and renamed over the old one, so a crash leaves the old or the new
record, never half of one):

    {"format": 1, "bpffs": "/sys/fs/bpf/xvs",
     "attach": {"interfaces": [...], "mode": ..., "sizes": {...}, "vlans": {...},
                "tunnel_source": {...}} or null,
     "services": [the services in the config shape of xvs_services: address,
                  port, protocol, sticky, destinations [{address, weight[,
                  mac]}], and where not at their default check, min_healthy,
                  forwarding and its parameters (_spec.SERVICE_FIELDS)],
     "maintenance": {"since": Unix time, "drain_timeout": s, "drain_rate": new
                  flows per second}, only while the balancer is out for maintenance
                  (see _maintenance)}

One record belongs to one pin root: it names its bpffs, and a run with
another bpffs is refused, so two balancers on one host (two pin roots)
keep two files.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time

from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

LOCK_FILE = "/run/lock/xvs-lb.lock"
LOCK_TIMEOUT = 300
FORMAT = 1


@contextlib.contextmanager
def host_lock(path=LOCK_FILE, timeout=LOCK_TIMEOUT, waiting=None):
    """Serialise xvs.lb runs on this host: one at a time changes the maps.
    waiting(), if given, is called while another run holds the lock (the
    agent tells systemd's watchdog it is alive, only waiting)."""
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        os.makedirs(d, 0o755)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (IOError, OSError) as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise XvsError("another xvs.lb run has held %s for %ds" % (path, timeout))
                if waiting:
                    waiting()
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def load(path, bpffs=None, required=False):
    """The record at path, or None when there is none (and not required).

    Refuses, naming the file, a record that cannot be read or parsed, one
    of another format, and one that belongs to another pin root than
    bpffs: a run must never overwrite a record it did not understand.
    """
    try:
        with open(path) as f:
            text = f.read()
    except (IOError, OSError) as e:
        if e.errno == errno.ENOENT and not required:
            return None
        raise XvsError("state_file=%s: cannot read the state of record: %s" % (path, e.strerror))
    try:
        record = json.loads(text)
    except ValueError as e:
        raise XvsError("state_file=%s: not a valid state of record (JSON: %s); fix or remove it"
                       % (path, e))
    if isinstance(record, dict) and "format" not in record and "purge" in record:
        # the xvs role's own file before there was a state of record: it
        # held only the role's variables; the maps are the better record
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise XvsError("state_file=%s: not an xvs.lb state of record of format %d; fix or remove it"
                       % (path, FORMAT))
    if not isinstance(record.get("services"), list) or not (
            record.get("attach") is None or isinstance(record["attach"], dict)):
        raise XvsError("state_file=%s: not a valid state of record (services must be a list, "
                       "attach a dict or null); fix or remove it" % path)
    if bpffs and record.get("bpffs") not in (None, bpffs) and (record["attach"] or record["services"]):
        raise XvsError("state_file=%s records the balancer pinned at bpffs=%s, not %s: give each "
                       "pin root its own state_file" % (path, record["bpffs"], bpffs))
    return record


def attach_section(interfaces, mode, sizes, vlans, tunnel_source):
    """The attachment as the state of record keeps it (JSON: VLAN ids as
    strings, interfaces sorted)."""
    return {"interfaces": sorted(interfaces), "mode": mode, "sizes": dict(sizes),
            "vlans": dict((str(k), v) for k, v in sorted((vlans or {}).items())),
            "tunnel_source": dict(tunnel_source or {})}


def attach_section_from_status(st):
    """The record's attachment for a balancer attached before it had a
    record: what is attached now, in one mode where all agree."""
    modes = set(st["interfaces"].values())
    return attach_section(st["interfaces"], modes.pop() if len(modes) == 1 else "auto",
                          st["sizes"], st["vlans"], st["tunnel_source"])


def make(bpffs, attach, services, maintenance=None):
    """A record; maintenance is the old record's (every run but
    xvs_maintenance's carries it over unchanged: see maintenance_of)."""
    record = {"format": FORMAT, "bpffs": bpffs, "attach": attach, "services": services}
    if maintenance:          # absent in service: a record from before stays unchanged
        record["maintenance"] = maintenance
    return record


def maintenance_of(record):
    """The record's maintenance section (None: in service, also for a
    record older than maintenance and for no record)."""
    return (record or {}).get("maintenance")


def save(path, record):
    """Write the record atomically, root-only (see replace_file)."""
    replace_file(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def replace_file(path, data):
    """Write data to path atomically: a temporary file in the same
    directory, fsynced, renamed over the old one; mode 0600 in a 0700
    directory made when missing.  A crash leaves the old file or the new
    one, never half of one."""
    d = os.path.dirname(path) or "."
    if not os.path.isdir(d):
        os.makedirs(d, 0o700)
    fd, tmp = tempfile.mkstemp(prefix=".xvs-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except Exception:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def same_content(path, data):
    """Whether path holds exactly data (False when it is missing)."""
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except (IOError, OSError):
        return False
