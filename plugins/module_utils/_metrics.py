# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The balancer's metrics in the Prometheus text format, for xvs-agent.

prometheus_client (Debian's python3-prometheus-client) renders and serves
them: a collector reads the maps at each scrape, so the numbers are the
kernel's at that moment, the same the xvs_info module returns.  Reading
takes no host lock (a scrape must not wait for, or hold up, a module run)
and reads each map in batches: one call for the global counters, one per
service for its destinations' counters, one for the service counters.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.xvs.lb.plugins.module_utils import _announce, _layout as L, _loader
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane, flow_owner
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

SERVICE_LABELS = ["vip", "port", "protocol"]
DESTINATION_LABELS = SERVICE_LABELS + ["destination"]
# a destination's state (docs/design.md section 2.5), one series per state
DESTINATION_STATES = ("up", "drained", "failing", "unresolved")
# the global counters (see _layout.COUNTERS) as Prometheus families:
# counter name -> (metric name, label name, label value)
FRAME_ENDS = dict((n, ("xvs_dropped_packets", "reason", n[len("drop_"):]) if n.startswith("drop_")
                   else ("xvs_packets", "action", n)) for n in L.VERDICT_COUNTERS)
HELP = {
    "xvs_received_packets": "Frames the XDP program saw.",
    "xvs_received_bytes": "Bytes of the frames the XDP program saw.",
    "xvs_packets": "Frames by where they ended (pass to the kernel, tx, redirect, ICMP echo reply, "
                   "ICMP fragmentation-needed for a frame too big to tunnel).",
    "xvs_dropped_packets": "Frames dropped, by reason.",
    "xvs_icmp_ptb_forwarded": "ICMP fragmentation-needed messages steered to a destination.",
    "xvs_new_flows": "Flows that selected a destination.",
    "xvs_flow_reselect": "Flow records replaced (idle past the timeout, or destination gone).",
    "xvs_encap_ipip": "Frames forwarded through an IPIP tunnel.",
    "xvs_encap_gue": "Frames forwarded through a GUE tunnel.",
}


def counter_metric(name):
    """The metric of a global counter that is not a frame end."""
    return {"rx_packets": "xvs_received_packets", "rx_bytes": "xvs_received_bytes"}.get(name, "xvs_" + name)


STATS_HELP = {"packets": "Packets forwarded to the %s.", "bytes": "Bytes forwarded to the %s.",
              "new_flows": "New flows that selected the %s."}


def _stats_family(factory, name, labels):
    """xvs_<name>_{packets,bytes,new_flows}: what the program counted for
    each service or destination (summed over CPUs)."""
    return dict((f, factory("xvs_%s_%s" % (name, f), text % name, labels=labels)) for f, text in STATS_HELP.items())


class Collector(object):
    """A prometheus_client collector of the maps at agent.snapshot()'s pin
    root, with the agent's health, check durations and announcements, and
    the BGP sessions of the BIRD at bird_socket (if given)."""

    def __init__(self, agent, bird_socket=""):
        self.agent, self.bird_socket = agent, bird_socket

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        snap = self.agent.snapshot()
        bpffs, desired, targets, service_up = (snap["bpffs"], snap["services"], snap["targets"],
                                               snap["service_up"])
        yield from self._bgp(snap, GaugeMetricFamily)
        yield from self._agent(snap, CounterMetricFamily, GaugeMetricFamily)
        up = GaugeMetricFamily("xvs_dataplane_up", "1 when the program's maps could be read.")
        try:
            dp = DataPlane(bpffs) if bpffs else None
        except Exception:   # no attachment (yet): say so, keep serving the agent's own metrics
            dp = None
        up.add_metric([], 1 if dp else 0)
        yield up
        yield _build_info(bpffs if dp else None, GaugeMetricFamily)
        svc_up = GaugeMetricFamily("xvs_service_up", "1 while at least min_healthy destinations are healthy.",
                                   labels=SERVICE_LABELS)
        desired_weight = GaugeMetricFamily("xvs_destination_desired_weight",
                                           "The weight in the state of record.", labels=DESTINATION_LABELS)
        checks = _check_families(CounterMetricFamily, GaugeMetricFamily)
        for key in sorted(desired):
            svc_labels = [key[0], str(key[1]), key[2]]
            svc_up.add_metric(svc_labels, 1 if service_up.get(key, True) else 0)
            for address, d in sorted(desired[key]["destinations"].items()):
                labels = svc_labels + [address]
                desired_weight.add_metric(labels, d["weight"])
                t = targets.get((key, address))
                checks["healthy"].add_metric(labels, 1 if t is None or t["up"] else 0)
                if t is None:
                    continue            # not checked: no check series
                for field, family in checks.items():
                    if field != "healthy" and t[field] is not None:
                        family.add_metric(labels, t[field])
        yield from [svc_up, desired_weight] + list(checks.values())
        if dp is None:
            return
        with dp:
            services = dp.services()
            yield from self._maps(dp, services, CounterMetricFamily, GaugeMetricFamily)
        yield self._states(desired, services, GaugeMetricFamily)

    @staticmethod
    def _agent(snap, Counter, Gauge):
        """The agent's own applies of health to the maps."""
        yield Counter("xvs_agent_apply_failures", "Applies of health to the maps that failed (retried every "
                      "few seconds).", value=snap["apply_failures"])
        if snap["applied_at"] is not None:
            yield Gauge("xvs_agent_last_apply_success_timestamp_seconds",
                        "When the agent last applied health to the maps (Unix time).", value=snap["applied_at"])

    @staticmethod
    def _states(desired, services, Gauge):
        """xvs_destination_state: 1 for the state each desired destination
        is in, 0 for the others (an enum, as node_exporter's systemd unit
        states are), so a query needs no value mapping."""
        family = Gauge("xvs_destination_state",
                       "1 for the destination's state: up, drained (weight 0), failing (masked by its "
                       "health check), unresolved (in the state of record, not in the maps yet).",
                       labels=DESTINATION_LABELS + ["state"])
        held = dict(((s["address"], s["port"], s["protocol"], d["address"]), d["state"])
                    for s in services for d in s["destinations"])
        for key in sorted(desired):
            for address in sorted(desired[key]["destinations"]):
                now = held.get(key + (address,), "unresolved")
                for state in DESTINATION_STATES:
                    family.add_metric([key[0], str(key[1]), key[2], address, state], 1 if state == now else 0)
        return family

    def _bgp(self, snap, Gauge):
        yield Gauge("xvs_maintenance", "1 while the state of record has the balancer out for maintenance.",
                    value=1 if snap["maintenance"] else 0)
        announced = snap["announced"]
        if announced is not None:
            vips = Gauge("xvs_vip_announced", "1 while the VIP's host route is offered to BIRD for BGP.",
                         labels=["vip"])
            draining = Gauge("xvs_vip_draining", "1 while the VIP is announced for a graceful shutdown "
                             "(GRACEFUL_SHUTDOWN community, lowered preference).", labels=["vip"])
            for vip, on in sorted(announced.items()):
                vips.add_metric([vip], 1 if on else 0)
                draining.add_metric([vip], 1 if vip in snap["draining"] else 0)
            yield vips
            yield draining
        if not self.bird_socket:
            return
        bird = Gauge("xvs_bird_up", "1 when BIRD's control socket answered.")
        sessions = Gauge("xvs_bgp_session_up", "1 while the BGP session is Established.",
                         labels=["protocol", "neighbor"])
        try:
            for sess in _announce.bgp_sessions(self.bird_socket):
                sessions.add_metric([sess["protocol"], sess["neighbor"]], 1 if sess["established"] else 0)
            bird.add_metric([], 1)
        except OSError:
            bird.add_metric([], 0)
        yield bird
        yield sessions

    @staticmethod
    def _maps(dp, services, Counter, Gauge):
        counters = dp.counters()
        families = {}
        for name, value in counters.items():
            if name in FRAME_ENDS:
                metric, label, label_value = FRAME_ENDS[name]
                if metric not in families:
                    families[metric] = Counter(metric, HELP[metric], labels=[label])
                families[metric].add_metric([label_value], value)
            else:
                metric = counter_metric(name)
                families[metric] = Counter(metric, HELP[metric], value=value)
        for metric in sorted(families):
            yield families[metric]
        census = dp.flow_census()       # both flow tables, read once a scrape
        table = dp.flow_table(census)
        capacity = Gauge("xvs_flow_table_capacity", "Flow records the table can hold.", labels=["family"])
        entries = Gauge("xvs_flow_table_entries", "Flow records in the table.", labels=["family"])
        for family, t in sorted(table["families"].items()):
            capacity.add_metric([family], t["capacity"])
            entries.add_metric([family], t["entries"])
        yield capacity
        yield entries
        # the kernel evicts without telling; the count is derived from
        # counters that do not tell the families apart (see flow_table)
        yield Counter("xvs_flow_table_evictions", "Flow records the kernel evicted to make room (both tables).",
                      value=table["evicted"])
        svc = _stats_family(Counter, "service", SERVICE_LABELS)
        dest = _stats_family(Counter, "destination", DESTINATION_LABELS)
        weight = Gauge("xvs_destination_weight", "The weight written to the maps (0 while drained by health).",
                       labels=DESTINATION_LABELS)
        active = Gauge("xvs_destination_active_flows",
                       "Unexpired flow records naming the destination: its connections (a drain is complete at 0).",
                       labels=DESTINATION_LABELS)
        digest = Gauge("xvs_service_table_info",
                       "1, with the digest of the service's live Maglev table (equal on balancers that agree).",
                       labels=SERVICE_LABELS + ["digest"])
        svc_stats = dp.services_stats([s["index"] for s in services])
        for s in services:
            labels = [s["address"], str(s["port"]), s["protocol"]]
            for f, family in svc.items():
                family.add_metric(labels, svc_stats[s["index"]][f])
            digest.add_metric(labels + [dp.digest(s)], 1)
            slots = dp.dests_stats(s["index"], [d["slot"] for d in s["destinations"]])
            for d in s["destinations"]:
                weight.add_metric(labels + [d["address"]], d["weight"])
                active.add_metric(labels + [d["address"]], census["active"][flow_owner(s["index"], d)])
                for f, family in dest.items():
                    family.add_metric(labels + [d["address"]], slots[d["slot"]][f])
        yield from list(svc.values()) + list(dest.values()) + [weight, active, digest]


def _check_families(Counter, Gauge):
    """The families of a checked destination, by its snapshot() field."""
    return {
        "healthy": Gauge("xvs_destination_healthy",
                         "1 unless the destination's check failed (fall) and has not passed (rise) since.",
                         labels=DESTINATION_LABELS),
        "duration": Gauge("xvs_check_duration_seconds", "How long the destination's last check took.",
                          labels=DESTINATION_LABELS),
        "timeout": Gauge("xvs_check_timeout_seconds", "The check's timeout: a check this slow fails.",
                         labels=DESTINATION_LABELS),
        "failures": Counter("xvs_check_failures", "Checks of the destination that failed.",
                            labels=DESTINATION_LABELS),
        "transitions": Counter("xvs_destination_transitions", "Times the destination went down or up "
                               "(at its fall or rise count).", labels=DESTINATION_LABELS),
        "changed_at": Gauge("xvs_destination_last_transition_timestamp_seconds",
                            "When the destination last went down or up (Unix time).", labels=DESTINATION_LABELS),
    }


def _build_info(bpffs, Gauge):
    """xvs_build_info: 1, labelled with the collection's version, the
    data-plane ABI and the attached program's tag (empty when none is
    pinned), as Prometheus' own <name>_build_info series are."""
    tag = ""
    if bpffs:
        try:
            with _loader.open_pinned(bpffs) as p:
                tag = p.info["tag"]
        except (OSError, XvsError):
            pass
    info = Gauge("xvs_build_info", "1, labelled with the version of xvs.lb, the data-plane ABI and the "
                 "loaded program's tag.", labels=["version", "abi", "tag"])
    info.add_metric([L.VERSION, str(L.ABI_VERSION), tag], 1)
    return info


def listen_address(text):
    """("address", port) of "address:port" ("[v6]:port" for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("metrics listen address %r: must be address:port" % text)
    return host.strip("[]"), int(port)
