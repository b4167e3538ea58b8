# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The xvs-agent command (see --help): its options, the metrics' HTTP
server and textfile, systemd's notifications (READY, the watchdog), and
the signals that stop it.  The role's xvs-agent script runs main() with
the system Python from the restore's library; the checks' scheduling is
_agent.Agent."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import socket
import threading
import time

from ansible_collections.xvs.lb.plugins.module_utils import _announce, _spec
from ansible_collections.xvs.lb.plugins.module_utils._agent import Agent
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError
from ansible_collections.xvs.lb.plugins.module_utils._journal import ERR

WATCHDOG_EVERY = 2.0    # s between "alive" notes to systemd (the unit's WatchdogSec is 30)


def _notify(state):
    """Tell systemd (Type=notify, WatchdogSec) how the agent is: a
    datagram to $NOTIFY_SOCKET, which is all sd_notify(3) does; without
    systemd there is no socket and nothing to tell."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]            # an abstract socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(state.encode(), path)
    except OSError:
        pass
    finally:
        s.close()


def _parser():
    import argparse
    parser = argparse.ArgumentParser(prog="xvs-agent", description="xvs.lb health checks, metrics, VIP announcement")
    parser.add_argument("state_file", nargs="?", default=_spec.DEFAULT_STATE_FILE)
    parser.add_argument("--metrics-listen", default="", help="serve metrics at ADDRESS:PORT")
    parser.add_argument("--metrics-textfile", default="", help="write metrics to this file")
    parser.add_argument("--textfile-interval", type=float, default=15.0)
    parser.add_argument("--bgp-table", type=int, default=0,
                        help="announce VIPs as host routes in this kernel table (BIRD exports it)")
    parser.add_argument("--bgp-drain-table", type=int, default=0,
                        help="announce draining VIPs (maintenance) in this table (default: --bgp-table + 1)")
    parser.add_argument("--announce", choices=_announce.ANNOUNCE_POLICIES, default="any",
                        help="a VIP is announced while any (or all) of its services are up")
    parser.add_argument("--bird-socket", default="", help="BIRD's control socket, for the BGP metrics")
    parser.add_argument("--withdraw", action="store_true", help="withdraw every VIP and exit")
    return parser


def _serve_metrics(agent, args, log):
    """Start the metrics' HTTP server and textfile writer the options ask
    for: the textfile's periodic writer (or None), or an XvsError."""
    from ansible_collections.xvs.lb.plugins.module_utils import _metrics
    try:
        import prometheus_client
    except ImportError:
        raise XvsError("metrics need prometheus_client (Debian: python3-prometheus-client)")
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_metrics.Collector(agent, args.bird_socket))
    # process_* (CPU, memory, open files, start time), as every exporter serves
    prometheus_client.ProcessCollector(registry=registry)
    if args.metrics_listen:
        try:
            address, port = _metrics.listen_address(args.metrics_listen)
            prometheus_client.start_http_server(port, address, registry)
        except (ValueError, OSError) as e:
            raise XvsError("--metrics-listen %s: %s" % (args.metrics_listen, e))
        log("xvs-agent: metrics on http://%s/metrics" % args.metrics_listen)
    if not args.metrics_textfile:
        return None
    return _periodic(args.textfile_interval, lambda: _write_textfile(
        agent, prometheus_client, args.metrics_textfile, registry))


def main(argv, log=None):
    """The agent command (see --help); runs until SIGTERM or SIGINT and
    then withdraws its VIPs.  --withdraw only withdraws them (the unit's
    ExecStopPost, for an agent that died).  Exit 1 with one line on stderr
    when it cannot start."""
    import signal
    import sys
    from ansible_collections.xvs.lb.plugins.module_utils import _journal

    log = log or _journal.Log()
    args = _parser().parse_args(argv)
    # systemd's watchdog restarts an agent whose loop stopped turning
    watchdog = _periodic(WATCHDOG_EVERY, lambda: _notify("WATCHDOG=1"))
    try:
        announcer = _announce.Announcer(args.bgp_table, args.bgp_drain_table) if args.bgp_table else None
        agent = Agent(args.state_file, log, announcer=announcer, policy=args.announce,
                      alive=lambda: watchdog(time.monotonic()))
        if args.withdraw:
            agent.withdraw()
            return 0
        textfile = _serve_metrics(agent, args, log) if args.metrics_listen or args.metrics_textfile else None
    except XvsError as e:
        _journal.Log(sys.stderr)("xvs-agent: %s" % e, ERR)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: stop.set())
    _notify("READY=1")
    try:
        agent.run(stop, textfile)
    finally:
        _notify("STOPPING=1")
        agent.withdraw()       # a stopping agent withdraws before it exits
    log("xvs-agent: stopped")
    return 0


def _periodic(interval, fn):
    due = [0.0]

    def tick(now):
        if now >= due[0]:
            due[0] = now + interval
            fn()
    return tick


def _write_textfile(agent, prometheus_client, path, registry):
    try:
        prometheus_client.write_to_textfile(path, registry)
    except OSError as e:
        agent._once("xvs-agent: --metrics-textfile %s: %s" % (path, e))
