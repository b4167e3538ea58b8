"""Contract 5 with real traffic through real XDP: wrk makes a new
connection per request (Connection: close) through the VIP from a client
whose 64 ephemeral ports are each reused many times a second, so every
SYN reuses a tuple whose flow record points somewhere.

- A backend's server is killed under that load: once xvs-agent has had
  fall x interval + 1 s to notice, no request fails and no SYN for the VIP
  reaches the dead backend (counted on its own interface by an XDP counter).
- An operator drains a backend (weight 0, xvs_destination): no new
  connection reaches it, whatever client port it comes from, while a long
  download from it that was open before the drain completes.
- A backend that is off at boot: the restore brings the service up without
  it (exit 0), and xvs-agent adds it to the maps once it answers.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _health, _loader
from xvstest.lab import BIG, VIP, dsr_lab, inside, stop_http_server, wait_for
from xvstest.modules import Modules, agent_command, restore_command

BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22", "b3": "192.0.2.23"}
INTERVAL, FALL = 0.5, 2
CHECK = {"type": "http", "path": "/whoami", "interval": INTERVAL, "timeout": 0.4, "fall": FALL, "rise": 2}
# The client's ephemeral ports: 64, each reused many times a second, as a
# busy NAT gateway reuses its ports.  wrk often closes first, so the client
# keeps no TIME_WAIT (tcp_max_tw_buckets=0) or the ports would run out.
PORTS = (40000, 40063)
REUSED = 10 * (PORTS[1] - PORTS[0] + 1)      # requests a second: every port reused 10 times

SYN_COUNTER = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
BPF_ARRAY(syns, u64, 1);
int count(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    if ((void *)(ip + 1) > end || eth->h_proto != htons(ETH_P_IP) || ip->protocol != IPPROTO_TCP ||
        ip->daddr != VIP_BE)
        return XDP_PASS;
    struct tcphdr *t = (void *)ip + ip->ihl * 4;
    if ((void *)(t + 1) <= end && t->syn && !t->ack) {
        u32 k = 0;
        u64 *n = syns.lookup(&k);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
    return XDP_PASS;
}
"""


class SynCounter(object):
    """SYNs for the VIP arriving at one backend, counted by an XDP program
    (generic mode) on its eth0: what reaches it, whatever it does next."""

    def __init__(self, ns):
        from bcc import BPF
        import socket
        self.ns = ns
        vip_be = int.from_bytes(socket.inet_aton(VIP), sys.byteorder)
        self.b = BPF(text=SYN_COUNTER.encode(), cflags=["-DVIP_BE=%du" % vip_be])
        fn = self.b.load_func(b"count", BPF.XDP)
        with inside(ns):
            BPF.attach_xdp(b"eth0", fn, 1 << 1)        # XDP_FLAGS_SKB_MODE

    def __call__(self):
        return sum(v.value for v in self.b[b"syns"].values())

    def close(self):
        from bcc import BPF
        with inside(self.ns):
            BPF.remove_xdp(b"eth0", 1 << 1)
        self.b.cleanup()


# GET /big from a given client port, reading 8 KiB every 0.1 s through a
# small receive buffer, so the server keeps sending and the client keeps
# ACKing through the balancer for about 3 s; prints the status and the
# bytes of the body.
SLOW_GET = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
s.bind(("", int(sys.argv[2])))
s.connect((sys.argv[1], 80))
s.sendall(b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while True:
    chunk = s.recv(8192)
    if not chunk:
        break
    data += chunk
    time.sleep(0.1)
head, body = data.split(b"\r\n\r\n", 1)
print(head.split()[1].decode(), len(body), end="")
"""


def wrk(lab, seconds):
    """{requests, errors}: errors are socket errors of every kind and
    non-2xx answers, from wrk's summary."""
    r = lab.sh(lab.name("cli"), "wrk -t2 -c16 -d%ds --timeout 2s -H 'Connection: close' http://%s/whoami"
               % (seconds, VIP), check=False, timeout=seconds + 30)
    assert r.returncode == 0, r.stdout + r.stderr
    requests = int(re.search(r"(\d+) requests in", r.stdout).group(1))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", r.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return {"requests": requests, "errors": errors + (int(non2xx.group(1)) if non2xx else 0), "out": r.stdout}


class Balancer(object):
    def __init__(self, lab, bpffs, tmp_path):
        self.lab, self.ns = lab, lab.name("bal")
        self.mods = Modules(self.ns, os.path.join(bpffs, "failover"))
        self.agent = None
        self.log = str(tmp_path / "agent.log")
        self.counters = {}

    def setup(self, check):
        service = {"address": VIP, "port": 80, "check": check,
                   "destinations": [{"address": a} for a in sorted(BACKENDS.values())]}
        for name, args in [("xvs_attach", {"interfaces": ["eth0"],
                                           "sizes": {"flow_table_size": 65536, "max_services": 8}}),
                           ("xvs_services", {"config": [service]})]:
            rc, res = self.mods.call(name, args)
            assert rc == 0 and res["changed"], res
        lo, hi = PORTS
        self.lab.sh(self.lab.name("cli"), "sysctl -qw net.ipv4.ip_local_port_range='%d %d' net.ipv4.tcp_max_tw_buckets=0"
                    % (lo, hi))
        for short in BACKENDS:
            self.counters[short] = SynCounter(self.lab.name(short))

    def start_agent(self):
        """xvs-agent as its unit runs it (python3 from the library path)."""
        out = open(self.log, "a")
        self.agent = subprocess.Popen(["ip", "netns", "exec", self.ns] + agent_command(self.mods.state_file),
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        wait_for(lambda: "checked destination(s)" in self.logged(), what="the agent's start")

    def logged(self):
        with open(self.log) as f:
            return f.read()

    def weight(self, address):
        rc, res = self.mods.call("xvs_info", {})
        assert rc == 0, res
        return [d for d in res["services"][0]["destinations"] if d["address"] == address][0]

    def close(self):
        if self.agent is not None:
            os.killpg(self.agent.pid, signal.SIGKILL)
            self.agent.wait()
        for c in self.counters.values():
            c.close()
        with inside(self.ns):
            _loader.detach("eth0")
        _loader.unpin_all(self.mods.root)
        _health.remove(self.mods.state_file)
        self.mods.close()


@pytest.fixture
def balancer(bpffs, tmp_path):
    with dsr_lab("xf", tmp_path, BACKENDS) as lab:
        b = Balancer(lab, bpffs, tmp_path)
        try:
            yield b
        finally:
            b.close()


def test_no_request_fails_once_a_dead_backend_is_drained_whatever_port_the_client_reuses(balancer):
    b = balancer
    b.setup(CHECK)
    b.start_agent()
    warm = wrk(b.lab, 3)      # every port's record made, to every backend
    assert warm["errors"] == 0 and warm["requests"] > 3 * REUSED, warm["out"]
    assert all(c() > 0 for c in b.counters.values())

    stop_http_server(b.lab, "b2")
    time.sleep(FALL * INTERVAL + 1)
    state = b.weight(BACKENDS["b2"])
    assert (state["weight"], state["state"]) == (0, "failing"), state
    syns = b.counters["b2"]()
    after = wrk(b.lab, 5)
    assert after["errors"] == 0, after["out"]
    assert after["requests"] > 5 * REUSED, after["out"]
    assert b.counters["b2"]() == syns, "SYNs for the VIP reached the dead backend"
    assert re.search(r"destination 192\.0\.2\.22 down", b.logged())


def test_an_operators_drain_sends_no_new_connection_and_keeps_a_download(balancer):
    b = balancer
    b.setup(None)
    warm = wrk(b.lab, 3)
    assert warm["errors"] == 0, warm["out"]
    # a download from b2 through the VIP, read slowly to outlast the drain
    cli = b.lab.name("cli")
    port = next(p for p in range(45000, 45400)
                if b.lab.sh(cli, "curl -s --max-time 3 --local-port %d http://%s/whoami" % (p, VIP),
                            check=False).stdout == "b2")
    syns = b.counters["b2"]()
    download = subprocess.Popen(["ip", "netns", "exec", cli, "/usr/bin/python3", "-c", SLOW_GET, VIP, str(port)],
                                stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        rc, res = b.mods.call("xvs_destination", {"service_address": VIP, "service_port": 80,
                                                  "address": BACKENDS["b2"], "weight": 0})
        assert rc == 0 and res["changed"] and res["destination"]["state"] == "drained", res
        assert download.poll() is None, "the download ended before the drain"
        assert b.counters["b2"]() == syns + 1          # its SYN: b2 serves it
        syns += 1
        after = wrk(b.lab, 3)
        assert after["errors"] == 0, after["out"]
        assert after["requests"] > 3 * REUSED, after["out"]
        assert b.counters["b2"]() == syns, "a new connection reached the drained backend"
        assert download.communicate(timeout=30)[0] == "200 %d" % BIG
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert [b.weight(BACKENDS[s])["state"] for s in ("b1", "b2", "b3")] == ["up", "drained", "up"]


def test_the_agent_adds_a_destination_that_answers_after_the_boot(balancer, tmp_path):
    b = balancer
    b.setup(CHECK)
    b.lab.sh(b.lab.name("b3"), "ip link set eth0 down")        # off, as at a power cut
    with inside(b.ns):
        _loader.detach("eth0")                               # what the reboot loses
    _loader.unpin_all(b.mods.root)
    b.lab.sh(b.ns, "ip neigh flush all")
    r = subprocess.run(["ip", "netns", "exec", b.ns] + restore_command(tmp_path) + [b.mods.state_file],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cannot resolve the MAC address of 192.0.2.23" in r.stdout
    rc, res = b.mods.call("xvs_info", {})
    assert [u["destination"] for u in res["unresolved"]] == [BACKENDS["b3"]], res
    b.start_agent()
    wait_for(lambda: "192.0.2.23" in b.logged(), what="the agent's word on b3")
    b.lab.sh(b.lab.name("b3"), "ip link set eth0 up")
    wait_for(lambda: "destination 192.0.2.23 answers: now in the maps" in b.logged(), timeout=20,
             what="b3 added by the agent")
    # its check failed while it was off: up once `rise` checks pass
    wait_for(lambda: b.weight(BACKENDS["b3"])["state"] == "up", timeout=20, what="b3 up")
    rc, res = b.mods.call("xvs_info", {})
    assert res["unresolved"] == [], res
    assert wrk(b.lab, 2)["errors"] == 0
    assert b.counters["b3"]() > 0
