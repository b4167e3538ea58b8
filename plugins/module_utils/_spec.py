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

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

DEFAULT_BPFFS = "/sys/fs/bpf/xvs"
DEFAULT_STATE_FILE = "/etc/xvs/state.json"
DEFAULT_BGP_TABLE = 4242     # the kernel table xvs-agent announces VIPs in (the role's xvs_bgp_table)
MAX_WEIGHT = 65535
# What an option left out means for a service that does not exist yet (and,
# with state replaced or overridden, for every listed one); with merged an
# option left out keeps the current value.
DEFAULT_PROTOCOL = "tcp"
DEFAULT_STICKY = False
DEFAULT_WEIGHT = 1
# How a service reaches its destinations (docs/design.md §2.13): on the
# balancer's segment (l2) or through a tunnel; the methods, their
# parameters and defaults are _layout.METHODS.
FORWARDING = tuple(L.FORWARDING)
DEFAULT_FORWARDING = "l2"
DEFAULT_GUE_PORT = L.FORWARDING["gue"].params["gue_port"][0]
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
    # each method's parameters (gue_port), checked by their kind below
    **dict((param, dict(type="int")) for param in L.FORWARDING_PARAMS)
)
COMMON_OPTIONS = dict(
    bpffs=dict(type="path", default=DEFAULT_BPFFS),
    state_file=dict(type="path", default=DEFAULT_STATE_FILE),
)


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


# the kinds of a forwarding method's parameters (_layout.Method.params)
PARAM_KINDS = {"port": port}


def forwarding(label, given, current=None):
    """A service's forwarding: {"method": name} and the method's
    parameters.  given is {"method": name, parameter: value} as given (None
    or missing: left out), current the service's forwarding whose values
    left-out ones keep, or None for the defaults.  A parameter of another
    method is an error."""
    prefix = label + "." if label else ""
    given, current = given or {}, current or {"method": DEFAULT_FORWARDING}
    name = current["method"] if given.get("method") is None else given["method"]
    if name not in L.FORWARDING:
        raise XvsError("%sforwarding=%s: must be one of %s" % (prefix, name, ", ".join(FORWARDING)))
    method = L.FORWARDING[name]
    out = {"method": name}
    for param, owner in sorted(L.FORWARDING_PARAMS.items()):
        value = given.get(param)
        if param not in method.params:
            if value is not None:
                raise XvsError("%s%s: only for forwarding %s, not %s" % (prefix, param, owner, name))
            continue
        default, kind = method.params[param]
        out[param] = PARAM_KINDS[kind](prefix + param, current.get(param, default) if value is None else value)
    return out


def forwarding_config(value):
    """A service's forwarding in the config shape: forwarding and the
    method's parameters as options of their own."""
    out = {"forwarding": value["method"]}
    out.update((k, v) for k, v in value.items() if k != "method")
    return out


class Field(object):
    """A service option besides its key and destinations, as data: its
    default; how an entry gives it (read: the check of the value given,
    None when left out); how a given value combines with the current one
    (state merged; None current: a new service, or replaced and
    overridden); and its options in the config shape (the state of record,
    gathered, the diff), where it is left out at its default unless shown.
    service() and the planner loop over SERVICE_FIELDS: adding a service
    option is a row here, its argument spec above, and its documentation."""

    def __init__(self, name, default, check, shown=False, combine=None, config=None, read=None):
        self.name, self.default, self.shown = name, default, shown
        self._check = check          # (option label, value) -> the value, checked
        self._read = read            # (label, entry) -> the value given, checked
        self._combine = combine      # (label, given, current) -> value
        self._config = config or (lambda value: {name: value})

    def read(self, label, entry):
        """The value entry gives, checked; None when left out."""
        if self._read:
            return self._read(label, entry)
        value = entry.get(self.name)
        return None if value is None else self._check((label + "." if label else "") + self.name, value)

    def value(self, entry, current=None):
        """The option's value after a run: given in entry, else current,
        else the default."""
        given = entry.get(self.name)
        if self._combine:
            return self._combine(entry.get("label", ""), given, current)
        if given is not None:
            return given
        return self.default if current is None else current

    def config(self, value):
        if value == self.default and not self.shown:
            return {}
        return self._config(value)


def _given_forwarding(label, entry):
    """A service entry's forwarding options as given: {"method": the
    method or None, each method parameter: its value or None}, checked."""
    prefix = label + "." if label else ""
    given = dict((param, entry.get(param)) for param in L.FORWARDING_PARAMS)
    given["method"] = entry.get("forwarding")
    if given["method"] is not None:
        forwarding(label, given)      # checked here; planned with the current one
    for param, owner in L.FORWARDING_PARAMS.items():
        if given[param] is not None:
            PARAM_KINDS[L.FORWARDING[owner].params[param][1]](prefix + param, given[param])
    return given


SERVICE_FIELDS = (
    Field("sticky", DEFAULT_STICKY, boolean, shown=True),
    # a check given replaces the current one whole; its unset options are not shown
    Field("check", None, check,
          config=lambda c: {"check": dict((k, v) for k, v in c.items() if v is not None)}),
    Field("min_healthy", DEFAULT_MIN_HEALTHY,
          lambda option, v: _number(option, v, 0, L.SIZE_LIMITS["max_destinations"][2])),
    Field("forwarding", {"method": DEFAULT_FORWARDING}, None, read=_given_forwarding, combine=forwarding,
          config=forwarding_config),
)
FIELDS = dict((f.name, f) for f in SERVICE_FIELDS)


def bpffs(value):
    """The pin root, normalised: it goes into a C string literal (the
    program's pin paths), so it must be a plain absolute path."""
    if not isinstance(value, str) or not value.startswith("/") or '"' in value or "\\" in value \
            or "\n" in value:
        raise XvsError("bpffs=%s: must be an absolute path without quotes or backslashes" % value)
    return value.rstrip("/") or "/"


def vlans(value):
    """An 802.1Q trunk's {vlan id: prefix}, checked: ids 1-4094, IPv4
    prefixes; the balancer's own address in the prefix is allowed
    (192.0.2.2/24 means 192.0.2.0/24)."""
    out = {}
    for vid, prefix in (value or {}).items():
        try:
            n = int(vid)
        except (TypeError, ValueError):
            n = -1
        if not 1 <= n <= 4094:
            raise XvsError("vlans: %r is not a VLAN id (1-4094)" % (vid,))
        try:
            net = ipaddress.IPv4Network(str(prefix), strict=False)
        except ValueError:
            raise XvsError("vlans: %s: %r is not an IPv4 prefix" % (vid, prefix))
        if net.prefixlen == 0:
            raise XvsError("vlans: %s: %s is not an on-link prefix" % (vid, prefix))
        out[n] = str(net)
    return out


def tunnel_source(value):
    """The tunnels' outer source per family, {family: address}, checked:
    a unicast IPv4 address for ipv4, a global unicast IPv6 one for ipv6."""
    out = {}
    for fam, address in (value or {}).items():
        if address is None:
            continue
        kind = {"ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address}.get(fam)
        if kind is None:
            raise XvsError("tunnel_source: %s: must be ipv4 or ipv6" % fam)
        try:
            a = kind(str(address))
        except ValueError:
            a = None
        if a is None or a.is_unspecified or a.is_multicast or a.is_loopback or a.is_link_local \
                or str(a) == "255.255.255.255":
            raise XvsError("tunnel_source: %s=%s: not a unicast %s address"
                           % (fam, address, "IPv4" if fam == "ipv4" else "IPv6"))
        out[fam] = str(a)
    return out


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
    out = {"address": ip(prefix + "address", entry["address"]),
           "port": port(prefix + "port", entry["port"]),
           "protocol": protocol(prefix + "protocol", entry.get("protocol") or DEFAULT_PROTOCOL),
           "label": label, "destinations": None}
    out.update((f.name, f.read(label, entry)) for f in SERVICE_FIELDS)
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


def left_out(key, destinations=None):
    """A service entry that gives nothing but its key (and destinations):
    with state merged, every option keeps its current value."""
    out = dict((f.name, None) for f in SERVICE_FIELDS)
    out.update(address=key[0], port=key[1], protocol=key[2], label="", destinations=destinations)
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
