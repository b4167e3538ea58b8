# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`xvs`, the operator's command on a balancer, as ipvsadm -Ln is IPVS's:
services, destinations with their desired and effective weights, health
and live flows, counters and rates, and the flows themselves.

It reads the same layers the modules read (the state of record through
_planner, health through _health, the maps through _balancer and
_dataplane), changes nothing and takes no host lock, so it never waits for
a module run nor holds one up.  The xvs role installs it (xvs_cli_bin,
/usr/local/sbin/xvs) from the library the boot restore and xvs-agent run,
for the system Python, without Ansible.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import sys
import time

from ansible_collections.xvs.lb.plugins.module_utils import _health, _layout as L, _maglev, _maintenance, _planner, _spec
from ansible_collections.xvs.lb.plugins.module_utils._balancer import Balancer
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import flow_owner
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

EPILOG = """examples:
  xvs                          services, destinations, weights, health, live flows
  xvs status --stats           ... with packets, bytes and new flows since the maps were made
  xvs status --rate 2          ... with their rates per second over 2 s
  xvs status --json            everything, for scripts (and digests of the Maglev tables)
  xvs flows                    live flows per service and destination
  xvs flows --list --service 203.0.113.10:80/tcp --limit 20

exit status: 0 shown; 1 the balancer cannot be read (nothing attached, a
record that cannot be read): one line on stderr; 2 bad usage.
"""
STATS = ("packets", "bytes", "new_flows")
# ipvsadm -Ln's layout: a service row, then its destinations indented, the
# two the same width so that --stats and --rate columns line up.
SERVICE_ROW = "%-4s %-28s %-8s %-23s"
DESTINATION_ROW = "  -> %-28s %6s %7s %-11s %5d"


def status(bpffs, state_file, stats=False):
    """The balancer as `xvs status --json` prints it: the attachment, the
    flow table, and every service of the record or the maps with each
    destination's weights, state (up, drained, failing, unresolved) and
    live flows; with stats their counters."""
    with Balancer(bpffs) as bal:
        dp = bal.dp
        desired = _planner.recorded(bal, state_file)[1]
        failing = _health.load(state_file)
        census = dp.flow_census()
        in_maps = dict(((s["address"], s["port"], s["protocol"]), s) for s in dp.services())
        services = []
        for key in sorted(set(desired) | set(in_maps), key=_planner.sort_key):
            s, want = in_maps.get(key), desired.get(key)
            held = dict((d["address"], d) for d in (s["destinations"] if s else []))
            wanted = want["destinations"] if want else {}
            svc = {"address": key[0], "port": key[1], "protocol": key[2],
                   "sticky": (s or want)["sticky"], "in_maps": s is not None,
                   "digest": dp.digest(s) if s else None, "destinations": []}
            svc.update(_spec.forwarding_config((s or want)["forwarding"]))
            if stats and s:
                svc["counters"] = dp.service_stats(s["index"])
            for addr in sorted(set(held) | set(wanted), key=_maglev.sort_key):
                d = held.get(addr)
                row = {"address": addr, "weight": d["weight"] if d else None,
                       "desired_weight": wanted[addr]["weight"] if addr in wanted else None,
                       "state": d["state"] if d else "unresolved",
                       "reason": failing.get(key, {}).get(addr),
                       "active_flows": census["active"][flow_owner(s["index"], d)] if d else 0}
                if stats and d:
                    row["counters"] = dp.dest_stats(s["index"], d["slot"])
                svc["destinations"].append(row)
            services.append(svc)
        return {"bpffs": bal.root, "interfaces": bal.status["interfaces"], "program": bal.status["program"],
                "flow_table": dict(dp.flow_table(census), entries_by_family=census["entries"]),
                "maintenance": _maintenance.view(state_file, bal.root), "services": services}


def rates(first, second, seconds):
    """second with each service's and destination's counters turned into
    rates per second since first (taken seconds earlier)."""
    def per_second(a, b):
        return dict((f, (b[f] - a[f]) / seconds) for f in STATS)
    before = dict(((s["address"], s["port"], s["protocol"]), s) for s in first["services"])
    for s in second["services"]:
        was = before.get((s["address"], s["port"], s["protocol"]))
        if "counters" in s and was and "counters" in was:
            s["rates"] = per_second(was["counters"], s.pop("counters"))
        old = dict((d["address"], d) for d in (was or {}).get("destinations", []))
        for d in s["destinations"]:
            if "counters" in d and "counters" in old.get(d["address"], {}):
                d["rates"] = per_second(old[d["address"]]["counters"], d.pop("counters"))
    return second


def _endpoint(address, port):
    return "[%s]:%d" % (address, port) if ":" in address else "%s:%d" % (address, port)


def render(st, stats=False, rate=False):
    """`xvs status` as text, as dense as ipvsadm -Ln."""
    table = st["flow_table"]
    where = ", ".join("%s (%s)" % kv for kv in sorted(st["interfaces"].items())) or "no interface"
    lines = ["xvs.lb at %s on %s: program %s, live flows %d of %d"
             % (st["bpffs"], where, st["program"]["id"], table["entries"], table["capacity"])]
    m = st["maintenance"]
    if m["in_maintenance"]:
        said = (m["agent"] or {}).get("maintenance")
        lines.append("IN MAINTENANCE since %s (drain %gs, rate %g/s): %s" % (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["since"])), m["drain_timeout"], m["drain_rate"],
            "VIPs %s" % said if said else "no agent announcing"))
    extra = ("  %12s %14s %9s" % ("Packets", "Bytes", "NewFlows") if stats else
             "  %10s %12s %10s" % ("PPS", "BPS", "NewFlow/s") if rate else "")
    lines.append(SERVICE_ROW % ("Prot", "LocalAddress:Port", "Forward", "Table") + extra)
    lines.append(DESTINATION_ROW.replace("%5d", "%5s") % ("RemoteAddress", "Weight", "Desired", "State", "Flows")
                 + extra)

    def numbers(entry):
        if stats and "counters" in entry:
            c = entry["counters"]
            return "  %12d %14d %9d" % (c["packets"], c["bytes"], c["new_flows"])
        if rate and "rates" in entry:
            r = entry["rates"]
            return "  %10.1f %12.1f %10.1f" % (r["packets"], r["bytes"], r["new_flows"])
        return ""
    for s in st["services"]:
        forward = s["forwarding"] + (":%d" % s["gue_port"] if s.get("gue_port") else "")
        lines.append(SERVICE_ROW % (
            s["protocol"].upper(), _endpoint(s["address"], s["port"]) + (" sticky" if s["sticky"] else ""),
            forward, (s["digest"] or "not in the maps")[:16]) + numbers(s))
        for d in s["destinations"]:
            lines.append(DESTINATION_ROW % (
                d["address"], "-" if d["weight"] is None else d["weight"],
                "-" if d["desired_weight"] is None else d["desired_weight"], d["state"], d["active_flows"])
                + numbers(d))
    return "\n".join(line.rstrip() for line in lines)


def flows(bpffs, service=None, listed=False, limit=100):
    """Live flows: counts per service and destination, and with listed up
    to limit records ({client, client_port, vip, port, protocol,
    destination, idle_s}) of the service given ("VIP:PORT/PROTO") or all."""
    with Balancer(bpffs) as bal:
        dp = bal.dp
        census = dp.flow_census()
        counts, owners = [], {}
        for s in dp.services():
            key = (s["address"], s["port"], s["protocol"])
            if service and key != service:
                continue
            for d in s["destinations"]:
                owners[(s["index"], d["slot"])] = d["address"]
                counts.append({"address": key[0], "port": key[1], "protocol": key[2], "destination": d["address"],
                               "active_flows": census["active"][flow_owner(s["index"], d)]})
        out = {"flows": counts, "total": sum(c["active_flows"] for c in counts)}
        if listed:
            out["records"] = dp.flow_records(service, limit)
        return out


def service_arg(text):
    """VIP:PORT/PROTO ("[v6]:PORT/PROTO" too), checked as the modules do."""
    try:
        where, proto = text.rsplit("/", 1)
        address, port = where.rsplit(":", 1)
        return (_spec.ip("--service", address.strip("[]")), _spec.port("--service", int(port)),
                _spec.protocol("--service", proto))
    except (ValueError, XvsError):
        raise ValueError("--service %s: must be VIP:PORT/PROTO, as 203.0.113.10:80/tcp" % text)


def main(argv, bpffs=_spec.DEFAULT_BPFFS, state_file=_spec.DEFAULT_STATE_FILE, out=None):
    import argparse
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="xvs", description="Show an xvs.lb balancer (read only).",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="status", choices=["status", "flows"])
    parser.add_argument("--bpffs", default=bpffs, help="the pin root (default %(default)s)")
    parser.add_argument("--state-file", default=state_file, help="the state of record (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--version", action="version",
                        version="xvs.lb %s (data-plane ABI %d)" % (L.VERSION, L.ABI_VERSION))
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--stats", action="store_true", help="status: packets, bytes, new flows")
    shown.add_argument("--rate", type=float, nargs="?", const=1.0, metavar="SECONDS",
                       help="status: per second, over SECONDS (default 1)")
    parser.add_argument("--service", type=service_arg, help="flows: only this VIP:PORT/PROTO")
    parser.add_argument("--list", action="store_true", help="flows: list the records")
    parser.add_argument("--limit", type=int, default=100, help="flows: at most this many records (default 100)")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate: SECONDS must be above 0")
    try:
        if args.command == "flows":
            shown = flows(args.bpffs, args.service, args.list, args.limit)
            counts = ["%s/%s -> %s  %d" % (_endpoint(c["address"], c["port"]), c["protocol"],
                                           c["destination"], c["active_flows"]) for c in shown["flows"]]
            records = ["%s -> %s/%s  %s  idle %ds" % (_endpoint(f["client"], f["client_port"]),
                                                      _endpoint(f["vip"], f["port"]), f["protocol"],
                                                      f["destination"], f["idle_s"])
                       for f in shown.get("records", [])]
            text = "\n".join(counts + ["total %d" % shown["total"]] + records)
        else:
            shown = status(args.bpffs, args.state_file, stats=args.stats or args.rate is not None)
            if args.rate is not None:
                time.sleep(args.rate)
                shown = rates(shown, status(args.bpffs, args.state_file, stats=True), args.rate)
            text = render(shown, stats=args.stats, rate=args.rate is not None)
    except XvsError as e:
        sys.stderr.write("xvs: %s\n" % e)
        return 1
    out.write((json.dumps(shown, indent=2, sort_keys=True) if args.json else text) + "\n")
    return 0
