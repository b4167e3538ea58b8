# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The options of a service and its destinations: their argument specs,
defaults and limits, defined once, and the checks every entry point runs
on them (the modules, the boot restore, the role's argument_specs test).

Importable without Ansible: the boot restore validates the state file with
the same code the modules validate their arguments with.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import functools
import ipaddress
import re

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L, _loader

DEFAULT_BPFFS = "/sys/fs/bpf/xvs"
DEFAULT_STATE_FILE = "/etc/xvs/state.json"
MAX_WEIGHT = 65535
# What an option left out means for a service that does not exist yet (and,
# with state replaced or overridden, for every listed one); with merged an
# option left out keeps the current value.
DEFAULT_PROTOCOL = "tcp"
DEFAULT_STICKY = False
DEFAULT_WEIGHT = 1
# How a service reaches its destinations (docs/design.md §2.13): on the
# balancer's segment (l2) or through a tunnel; GUE's port is the one the
# Linux fou/gue documentation uses.
FORWARDING = tuple(L.FORWARDING)
DEFAULT_FORWARDING = "l2"
DEFAULT_GUE_PORT = 6080
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
# Health checks (run by xvs-agent): HAProxy's defaults for interval, rise
# and fall; a check that has not answered in a second has failed.
CHECK_TYPES = ("tcp", "http", "https", "exec")
CHECK_DEFAULTS = {"interval": 2.0, "timeout": 1.0, "rise": 2, "fall": 3}
HTTP_CHECK_DEFAULTS = {"path": "/", "expect_status": 200}
MAX_CHECK_INTERVAL = 3600
MIN_CHECK_INTERVAL = 0.1
MAX_RISE_FALL = 100
# a service is down (xvs-agent reports it) with fewer healthy destinations
DEFAULT_MIN_HEALTHY = 1

# Argument specs in AnsibleModule's form.  sticky and weight have no
# default here so that state=merged can tell "left out" from "given".
DESTINATION_OPTIONS = dict(
    address=dict(type="str", required=True),
    weight=dict(type="int"),
    mac=dict(type="str"),
)
# No defaults here either: _spec.check fills them, so the state of record
# and gathered show every value a check runs with.
CHECK_OPTIONS = dict(
    type=dict(type="str", required=True, choices=list(CHECK_TYPES)),
    port=dict(type="int"),
    path=dict(type="str"),
    host=dict(type="str"),
    expect_status=dict(type="int"),
    command=dict(type="str"),
    interval=dict(type="float"),
    timeout=dict(type="float"),
    rise=dict(type="int"),
    fall=dict(type="int"),
)
SERVICE_OPTIONS = dict(
    address=dict(type="str", required=True),
    port=dict(type="int", required=True),
    protocol=dict(type="str", default=DEFAULT_PROTOCOL, choices=sorted(L.PROTOCOLS)),
    sticky=dict(type="bool"),
    destinations=dict(type="list", elements="dict", options=DESTINATION_OPTIONS),
    check=dict(type="dict", options=CHECK_OPTIONS),
    min_healthy=dict(type="int"),
    forwarding=dict(type="str", choices=list(FORWARDING)),
    gue_port=dict(type="int"),
)
COMMON_OPTIONS = dict(
    bpffs=dict(type="path", default=DEFAULT_BPFFS),
    state_file=dict(type="path", default=DEFAULT_STATE_FILE),
)


class XvsError(Exception):
    """A problem the user fixes: reported as one line, nothing changed."""


@functools.lru_cache(maxsize=8192)
def _unicast_ipv4(text):
    """text normalised, or why it is not a unicast IPv4 address.  Cached: a
    thousand services name the same few hundred addresses again and again,
    and parsing them was most of a no-change run's CPU time."""
    try:
        a = ipaddress.IPv4Address(text)
    except ValueError:
        return None, "not an IPv4 address"
    if a.is_unspecified or a.is_multicast or a == ipaddress.IPv4Address("255.255.255.255"):
        return None, "not a unicast IPv4 address"
    return str(a), None


def ipv4(option, value):
    address, problem = _unicast_ipv4(str(value))
    if problem:
        raise XvsError("%s=%s: %s" % (option, value, problem))
    return address


@functools.lru_cache(maxsize=8192)
def _unicast_ip(text):
    """text normalised (IPv4, or IPv6 in its compressed form), or why it
    is not a unicast address a service can use.  IPv6 link-local and
    IPv4-mapped addresses are refused: neither names one host on the
    balancer's networks."""
    if ":" not in text:
        address, problem = _unicast_ipv4(text)
        return address, problem and problem.replace("IPv4 address", "IPv4 or IPv6 address")
    try:
        a = ipaddress.IPv6Address(text)
    except ValueError:
        return None, "not an IPv4 or IPv6 address"
    if a.is_unspecified or a.is_multicast or a.is_loopback or a.is_link_local or a.ipv4_mapped:
        return None, "not a unicast IPv6 address (link-local, loopback and IPv4-mapped are refused)"
    return str(a), None


def ip(option, value):
    """A VIP's or a destination's address: unicast IPv4 or IPv6."""
    address, problem = _unicast_ip(str(value))
    if problem:
        raise XvsError("%s=%s: %s" % (option, value, problem))
    return address


def family(address):
    return 6 if ":" in address else 4


def port(option, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise XvsError("%s=%s: must be a port number from 1 to 65535" % (option, value))
    return value


def weight(option, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WEIGHT:
        raise XvsError("%s=%s: must be an integer from 0 to %d" % (option, value, MAX_WEIGHT))
    return value


def mac(option, value):
    if not _MAC.match(str(value)):
        raise XvsError("%s=%s: not a MAC address (six hex octets separated by colons)"
                       % (option, value))
    raw = L.mac_bytes(value)
    if raw[0] & 1 or raw == b"\0" * 6:
        raise XvsError("%s=%s: not a unicast MAC address" % (option, value))
    return L.mac_str(raw)


def protocol(option, value):
    if value not in L.PROTOCOLS:
        raise XvsError("%s=%s: must be one of %s" % (option, value, ", ".join(L.PROTOCOLS)))
    return value


def boolean(option, value):
    if not isinstance(value, bool):
        raise XvsError("%s=%s: must be true or false" % (option, value))
    return value


def _number(option, value, low, high, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or not low <= value <= high:
        raise XvsError("%s=%s: must be %s from %s to %s"
                       % (option, value, "a number" if kind is float else "an integer", low, high))
    return kind(value)


# which check types read which options (besides port, interval, timeout, rise, fall)
_CHECK_ONLY = {"path": ("http", "https"), "host": ("http", "https"),
               "expect_status": ("http", "https"), "command": ("exec",)}


def check(label, item):
    """A service's health check, checked, with its defaults filled in;
    port None means the service's port."""
    prefix = label + "."
    if not isinstance(item, dict):
        raise XvsError("%s=%s: must be a dict with type and the check's options" % (label, item))
    _unknown(label, item, CHECK_OPTIONS)
    kind = item.get("type")
    if kind not in CHECK_TYPES:
        raise XvsError("%stype=%s: must be one of %s" % (prefix, kind, ", ".join(CHECK_TYPES)))
    given = dict((k, v) for k, v in item.items() if v is not None)
    for name, types in sorted(_CHECK_ONLY.items()):
        if name in given and kind not in types:
            raise XvsError("%s%s: only for type %s, not %s" % (prefix, name, " or ".join(types), kind))
    out = dict(CHECK_DEFAULTS, type=kind, port=None)
    if kind in ("http", "https"):
        out.update(HTTP_CHECK_DEFAULTS, host=None)
    out.update(given)
    if out["port"] is not None:
        port(prefix + "port", out["port"])
    out["interval"] = _number(prefix + "interval", out["interval"], MIN_CHECK_INTERVAL,
                              MAX_CHECK_INTERVAL, float)
    out["timeout"] = _number(prefix + "timeout", out["timeout"], MIN_CHECK_INTERVAL,
                             out["interval"], float)
    for name in ("rise", "fall"):
        out[name] = _number(prefix + name, out[name], 1, MAX_RISE_FALL)
    if kind in ("http", "https"):
        if not isinstance(out["path"], str) or not out["path"].startswith("/") \
                or any(c.isspace() for c in out["path"]):
            raise XvsError("%spath=%s: must be a URL path starting with / (no spaces)"
                           % (prefix, out["path"]))
        if out["host"] is not None and (not isinstance(out["host"], str) or not out["host"].strip()
                                        or any(c.isspace() for c in out["host"])):
            raise XvsError("%shost=%s: must be a host name (no spaces)" % (prefix, out["host"]))
        out["expect_status"] = _number(prefix + "expect_status", out["expect_status"], 100, 599)
    if kind == "exec" and (not isinstance(out.get("command"), str) or not out["command"].strip()):
        raise XvsError("%scommand: required for type exec (exit status 0 is healthy)" % prefix)
    return out


def forwarding(label, value, gue_port, current=None):
    """(forwarding, gue_port) of a service: value and gue_port as given
    (None: left out), current the service's (forwarding, gue_port) that
    left-out options keep, or None for the defaults.  gue_port is None
    unless forwarding is gue."""
    prefix = label + "." if label else ""
    cur_fwd, cur_port = current or (DEFAULT_FORWARDING, None)
    fwd = cur_fwd if value is None else value
    if fwd not in FORWARDING:
        raise XvsError("%sforwarding=%s: must be one of %s" % (prefix, fwd, ", ".join(FORWARDING)))
    if fwd != "gue":
        if gue_port is not None:
            raise XvsError("%sgue_port: only for forwarding gue, not %s" % (prefix, fwd))
        return fwd, None
    return fwd, port(prefix + "gue_port", gue_port if gue_port is not None
                     else cur_port if cur_port is not None else DEFAULT_GUE_PORT)


def bpffs(value):
    try:
        return _loader.check_root(value)
    except _loader.LoaderError as e:
        raise XvsError(str(e))


def _unknown(label, entry, allowed):
    extra = sorted(set(entry) - set(allowed))
    if extra:
        raise XvsError("%s: unknown option(s) %s" % (label or "options", ", ".join(extra)))


def service_key(entry):
    return (entry["address"], entry["port"], entry["protocol"])


def destination(label, item):
    """One destination entry, checked: {address, weight or None, mac or None}."""
    prefix = label + "." if label else ""
    if not isinstance(item, dict):
        raise XvsError("%s=%s: must be a dict with address, weight, mac" % (label, item))
    _unknown(label, item, DESTINATION_OPTIONS)
    if item.get("address") is None:
        raise XvsError("%saddress: required" % prefix)
    w, m = item.get("weight"), item.get("mac")
    return {"address": ip(prefix + "address", item["address"]),
            "weight": None if w is None else weight(prefix + "weight", w),
            "mac": None if m is None else mac(prefix + "mac", m), "label": prefix}


def service(label, entry):
    """One service entry, checked and normalised; options left out are None
    (destinations None: not given).  label names the entry in errors
    ("config[3]"; "" for a module whose options are the entry)."""
    prefix = label + "." if label else ""
    if not isinstance(entry, dict):
        raise XvsError("%s=%s: must be a dict with address, port, protocol, sticky, destinations"
                       % (label, entry))
    _unknown(label, entry, SERVICE_OPTIONS)
    for name in ("address", "port"):
        if entry.get(name) is None:
            raise XvsError("%s%s: required" % (prefix, name))
    out_address = ip(prefix + "address", entry["address"])
    sticky, chk, least = entry.get("sticky"), entry.get("check"), entry.get("min_healthy")
    fwd, gue_port = entry.get("forwarding"), entry.get("gue_port")
    if fwd is not None:
        forwarding(label, fwd, gue_port)   # checked here; planned with the current one
    elif gue_port is not None:
        port(prefix + "gue_port", gue_port)
    out = {"address": out_address,
           "port": port(prefix + "port", entry["port"]),
           "protocol": protocol(prefix + "protocol", entry.get("protocol") or DEFAULT_PROTOCOL),
           "sticky": None if sticky is None else boolean(prefix + "sticky", sticky),
           "check": None if chk is None else check(prefix + "check", chk),
           "min_healthy": None if least is None else _number(
               prefix + "min_healthy", least, 0, L.SIZE_LIMITS["max_destinations"][2]),
           "forwarding": fwd, "gue_port": gue_port, "label": label,
           "destinations": None}
    if entry.get("destinations") is not None:
        if not isinstance(entry["destinations"], list):
            raise XvsError("%sdestinations=%s: must be a list" % (prefix, entry["destinations"]))
        seen = set()
        dests = []
        for i, item in enumerate(entry["destinations"]):
            d = destination("%sdestinations[%d]" % (prefix, i), item)
            if family(d["address"]) != family(out["address"]):
                raise XvsError("%sdestinations[%d].address=%s: an IPv%d destination for the IPv%d VIP %s: a "
                               "service and its destinations are one family"
                               % (prefix, i, d["address"], family(d["address"]), family(out["address"]),
                                  out["address"]))
            if d["address"] in seen:
                raise XvsError("%sdestinations[%d].address=%s: listed more than once"
                               % (prefix, i, d["address"]))
            seen.add(d["address"])
            dests.append(d)
        out["destinations"] = dests
    return out


def services(config, label="config"):
    """A whole list of service entries, every entry checked before any is
    used: {(address, port, protocol): entry}, in the order given."""
    if not isinstance(config, list):
        raise XvsError("%s=%s: must be a list of services" % (label, config))
    out = {}
    for i, entry in enumerate(config):
        s = service("%s[%d]" % (label, i), entry)
        key = service_key(s)
        if key in out:
            raise XvsError("%s[%d]: service %s:%d/%s listed more than once" % ((label, i) + key))
        out[key] = s
    return out
