"""Network namespaces for tests: created, used and always torn down.

Only documentation ranges are used, only inside the namespaces made here.
"""
import contextlib
import os
import re
import signal
import subprocess
import time

from pyroute2 import netns as _netns


class Lab(object):
    def __init__(self, tag, exact=False):
        # interface names are limited to 15 characters: keep the tag short
        self.tag = tag if exact else "%s%d" % (tag, os.getpid() % 100000)
        self.namespaces = []
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def name(self, short):
        return "%s-%s" % (self.tag, short)

    def add(self, short):
        ns = self.name(short)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        self.sh(ns, "ip link set lo up")
        return ns

    def sh(self, ns, cmd, check=True, **kw):
        return subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", cmd], check=check,
                              capture_output=True, text=True, **kw)

    def veth(self, ns1, if1, ns2, if2):
        subprocess.run(["ip", "link", "add", if1, "netns", ns1, "type", "veth",
                        "peer", "name", if2, "netns", ns2], check=True)
        self.sh(ns1, "ip link set %s up" % if1)
        self.sh(ns2, "ip link set %s up" % if2)

    def bg(self, ns, cmd):
        p = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", "exec " + cmd],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        self.namespaces = []


@contextlib.contextmanager
def inside(ns):
    """Run this process's netlink and bpf calls in ns for the block."""
    _netns.pushns(ns)
    try:
        yield
    finally:
        _netns.popns()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))


VIP = "203.0.113.10"
CLIENT = "192.0.2.10"
BALANCER = "192.0.2.2"
ECHO_PORT = 9000
BIG = 256 * 1024  # bytes of the backends' /big: DSR keeps these off the balancer
_ECHO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "echo.py")


@contextlib.contextmanager
def dsr_lab(tag, tmp_path, backends, realserver=True, exact=False):
    """A client, the balancer and backends on one bridge (in namespace
    "sw"); each backend serves HTTP on 80 (/whoami, /big) and the echo
    service, and (realserver=True) has the VIP on lo with the ARP sysctls
    DSR needs; otherwise that is left to the realserver role."""
    with Lab(tag, exact) as lab:
        build_dsr_lab(lab, tmp_path, backends, realserver)
        yield lab


def build_dsr_lab(lab, tmp_path, backends, realserver):
    """Build the dsr_lab topology into lab (which owns its cleanup)."""
    sw = lab.add("sw")
    lab.sh(sw, "ip link add br0 type bridge && ip link set br0 up")
    hosts = {"cli": CLIENT, "bal": BALANCER}
    hosts.update(backends)
    for short, addr in hosts.items():
        ns = lab.add(short)
        lab.veth(ns, "eth0", sw, "p-" + short)
        lab.sh(sw, "ip link set p-%s master br0" % short)
        lab.sh(ns, "ip addr add %s/24 dev eth0" % addr)
    # A veth hands its peer TCP segments with the checksum left to
    # "hardware" (CHECKSUM_PARTIAL); native XDP drops that note, so a
    # frame the balancer forwards would reach the backend with a bad
    # checksum.  Real NICs deliver complete checksums: make the client's
    # veth compute them too.
    lab.sh(lab.name("cli"), "ip route add %s/32 via %s && ethtool -K eth0 tx off >/dev/null"
           % (VIP, BALANCER))
    for short in backends:
        ns = lab.name(short)
        if realserver:
            lab.sh(ns, "ip addr add %s/32 dev lo && sysctl -qw net.ipv4.conf.all.arp_ignore=1 "
                       "net.ipv4.conf.all.arp_announce=2" % VIP)
    serve(lab, tmp_path, backends)
    xdp_pass_on_peer(lab)


def serve(lab, www_root, backends):
    """Each backend serves HTTP on 80 (/whoami: its name, /big) from
    www_root/<name> and the echo service; back once all answer."""
    for short in backends:
        www = www_root / short
        www.mkdir(parents=True, exist_ok=True)
        (www / "whoami").write_text(short)
        (www / "big").write_bytes(b"x" * BIG)
        http_server(lab, short, www)
        echo_server(lab, short)
    for short in backends:
        wait_for(lambda: lab.sh(lab.name(short), "curl -sf -o /dev/null http://127.0.0.1/whoami",
                                check=False).returncode == 0, what="http server in " + short)


def http_server(lab, short, www):
    """Start backend short's HTTP server on port 80, serving www over IPv4
    and IPv6 (http.server's dual-stack socket for ::)."""
    return lab.bg(lab.name(short), "/usr/bin/python3 -m http.server 80 --bind :: --directory %s" % www)


def stop_http_server(lab, short):
    """Kill backend short's HTTP server (SIGKILL: a crash, no goodbye)."""
    p = [p for p in lab.procs if p.args[3] == lab.name(short) and "http.server" in p.args[-1]][0]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    lab.procs.remove(p)


def echo_server(lab, short):
    """Start backend short's echo service on ECHO_PORT."""
    return lab.bg(lab.name(short), "/usr/bin/python3 %s %s %d" % (_ECHO, short, ECHO_PORT))


# IPv6 in the labs: two /64s, 2001:db8:1::/64 (FRONT6) and 2001:db8:2::/64
# (BACK6), each host's IPv6 address ending in its IPv4 address's last number
VIP6 = "2001:db8:100::10"
FRONT6, BACK6 = "2001:db8:1::", "2001:db8:2::"


def v6(side, ipv4):
    """A lab host's IPv6 address on side (FRONT6 or BACK6)."""
    return side + ipv4.rsplit(".", 1)[1]


# ---- the routed lab of the BGP scale-out (tests/integration/test_bgp.py, molecule/bgp)
# Dual-stack: the balancers' bridge is also FRONT6, the client's side BACK6.
CLIENT_NET_CLIENT, ROUTER_CLIENT_SIDE, ROUTER = "198.51.100.10", "198.51.100.1", "192.0.2.1"
BGP_BALANCERS = {"bal1": "192.0.2.2", "bal2": "192.0.2.3"}
ROUTER_AS, BALANCER_AS = 65000, 65001
ROUTER_BIRD = """
router id %(router)s;
protocol device { }
# every balancer's route for a VIP becomes one next hop of a multipath route
protocol kernel { merge paths on; ipv4 { import none; export all; }; }
protocol kernel { merge paths on; ipv6 { import none; export all; }; }
# RFC 8326, as a receiving router is asked to: a route with GRACEFUL_SHUTDOWN
# gets LOCAL_PREF 0, so it leaves the multipath route while it is still announced
filter graceful_shutdown { if (65535, 0) ~ bgp_community then bgp_local_pref = 0; accept; }
protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }
template bgp balancer { local as %(router_as)d; bfd on; ipv4 { import filter graceful_shutdown; export none; }; }
template bgp balancer6 { local as %(router_as)d; ipv6 { import filter graceful_shutdown; export none; }; }
%(neighbours)s
"""


def build_bgp_lab(lab, tmp_path, backends):
    """A client behind a router (BIRD 2, AS 65000, ECMP over the 5-tuple,
    IPv4 and IPv6 sessions to each balancer) and, on one bridge behind it,
    the balancers' namespaces (addresses only: the role and the agent do
    the rest) and backends with the VIPs (VIP, VIP6) on lo and their
    default routes through the router, each serving HTTP on 80 and the
    echo service."""
    sw = lab.add("sw")
    lab.sh(sw, "ip link add br0 type bridge && ip link set br0 up")
    router, cli = lab.add("rtr"), lab.add("cli")
    lab.veth(cli, "eth0", router, "eth1")
    lab.sh(cli, "ip addr add %s/24 dev eth0 && ip route add default via %s && ip -6 addr add %s/64 dev eth0 nodad "
                "&& ip -6 route add default via %s && ethtool -K eth0 tx off >/dev/null"
           % (CLIENT_NET_CLIENT, ROUTER_CLIENT_SIDE, v6(BACK6, CLIENT_NET_CLIENT), v6(BACK6, ROUTER_CLIENT_SIDE)))
    lab.sh(router, "ip addr add %s/24 dev eth1 && ip -6 addr add %s/64 dev eth1 nodad && sysctl -qw "
                   "net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 net.ipv6.conf.all.forwarding=1 "
                   "net.ipv6.fib_multipath_hash_policy=1" % (ROUTER_CLIENT_SIDE, v6(BACK6, ROUTER_CLIENT_SIDE)))
    for short, addr in dict(BGP_BALANCERS, rtr=ROUTER, **backends).items():
        ns = lab.name(short) if short == "rtr" else lab.add(short)
        lab.veth(ns, "eth0", sw, "p-" + short)
        lab.sh(sw, "ip link set p-%s master br0" % short)
        lab.sh(ns, "ip addr add %s/24 dev eth0 && ip -6 addr add %s/64 dev eth0 nodad" % (addr, v6(FRONT6, addr)))
    for short in backends:
        ns = lab.name(short)
        lab.sh(ns, "ip addr add %s/32 dev lo && ip route add default via %s && sysctl -qw "
                   "net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 && "
                   "ip -6 addr add %s/128 dev lo nodad && ip -6 route add default via %s"
                   % (VIP, ROUTER, VIP6, v6(FRONT6, ROUTER)))
    serve(lab, tmp_path / "www", backends)
    conf = tmp_path / "router-bird.conf"
    sessions = ["protocol bgp %s from balancer { neighbor %s as %d; }" % (short, addr, BALANCER_AS)
                for short, addr in sorted(BGP_BALANCERS.items())]
    sessions += ["protocol bgp %s_6 from balancer6 { neighbor %s as %d; }" % (short, v6(FRONT6, addr), BALANCER_AS)
                 for short, addr in sorted(BGP_BALANCERS.items())]
    conf.write_text(ROUTER_BIRD % {"router": ROUTER, "router_as": ROUTER_AS, "neighbours": "\n".join(sessions)})
    lab.bg(router, "/usr/sbin/bird -f -c %s -s %s" % (conf, tmp_path / "router-bird.ctl"))


# ---- the routed lab of layer-3 DSR (tests/integration/test_tunnel.py)
# The client and the balancer share one segment (VIP routed via the
# balancer); the backends are on another, behind a router.
ROUTED_FRONT = {"cli": CLIENT, "bal": BALANCER, "rtr": "192.0.2.1"}
ROUTED_BACK_ROUTER = "198.51.100.1"


def build_routed_lab(lab, tmp_path, backends):
    """Two bridges: front (client, balancer, router) and back (router,
    backends); the balancer routes the backends' net via the router, the
    backends route everything via the router and answer the client
    directly.  Backends serve HTTP and the echo service; the VIP, the
    sysctls and the decapsulation are the realserver role's to make."""
    for side in ("front", "back"):
        sw = lab.add("sw" + side)
        lab.sh(sw, "ip link add br0 type bridge && ip link set br0 up")
    hosts = [(short, "front", addr) for short, addr in ROUTED_FRONT.items()]
    hosts += [(short, "back", addr) for short, addr in backends.items()]
    hosts.append(("rtr", "back", ROUTED_BACK_ROUTER))
    for short, side, addr in hosts:
        ns = lab.name(short) if lab.name(short) in lab.namespaces else lab.add(short)
        dev = "eth1" if (short, side) == ("rtr", "back") else "eth0"
        sw = lab.name("sw" + side)
        lab.veth(ns, dev, sw, "p-" + short)
        lab.sh(sw, "ip link set p-%s master br0" % short)
        lab.sh(ns, "ip addr add %s/24 dev %s && ip -6 addr add %s/64 dev %s nodad"
               % (addr, dev, v6(FRONT6 if side == "front" else BACK6, addr), dev))
    lab.sh(lab.name("rtr"), "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    lab.sh(lab.name("cli"), "ip route add %s/32 via %s && ip -6 route add %s/128 via %s && "
           "ethtool -K eth0 tx off >/dev/null" % (VIP, BALANCER, VIP6, v6(FRONT6, BALANCER)))
    back_net = ROUTED_BACK_ROUTER.rsplit(".", 1)[0] + ".0/24"
    lab.sh(lab.name("bal"), "ip route add %s via %s && ip -6 route add %s/64 via %s"
           % (back_net, ROUTED_FRONT["rtr"], BACK6, v6(FRONT6, ROUTED_FRONT["rtr"])))
    for short in backends:
        lab.sh(lab.name(short), "ip route add default via %s && ip -6 route add default via %s"
               % (ROUTED_BACK_ROUTER, v6(BACK6, ROUTED_BACK_ROUTER)))
    serve(lab, tmp_path / "www", backends)
    with inside(lab.name("swfront")):
        _xdp_pass("p-bal")


def next_hops(lab, vip=VIP):
    """The router's next hops for vip (its kernel route, as BIRD put it)."""
    six = ":" in vip
    out = lab.sh(lab.name("rtr"), "ip -%d route show %s/%d" % (6 if six else 4, vip, 128 if six else 32)).stdout
    return sorted(re.findall(r"via (?:inet6 )?([0-9a-f.:]+)", out))


def xdp_pass_on_peer(lab):
    """Native XDP_TX on a veth reaches the peer only when the peer runs an
    XDP program itself (the kernel's veth XDP path needs one to receive the
    frames): give the switch side an XDP_PASS one."""
    with inside(lab.name("sw")):
        _xdp_pass("p-bal")


def _xdp_pass(ifname):
    from bcc import BPF
    b = BPF(text=b"int pass(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = b.load_func(b"pass", BPF.XDP)
    BPF.attach_xdp(ifname.encode(), fn, 1 << 2)  # XDP_FLAGS_DRV_MODE
    b.cleanup()


def echo_connect(ns, timeout=5, vip=VIP):
    """(socket, file, backend name) of a new connection from namespace ns
    to the backends' echo service through the VIP."""
    import socket
    with inside(ns):
        s = socket.create_connection((vip, ECHO_PORT), timeout=timeout)
    f = s.makefile("rb")
    return s, f, f.readline().strip().decode()


def curl(lab, path, port=None, timeout=5):
    """GET http://VIP/path from the client (from a given source port)."""
    local = "--local-port %d " % port if port else ""
    return lab.sh(lab.name("cli"), "curl -s --max-time %d %shttp://%s/%s" % (timeout, local, VIP, path),
                  check=False)


def main(argv):
    """For Molecule's create and destroy steps, which outlive one process:
    `lab.py up TAG DIR web1=192.0.2.21 ...` mounts a bpffs at DIR/bpffs and
    builds the lab (backends without the realserver settings, which the role
    makes), leaving it running; `lab.py up-bgp TAG DIR web1=...` builds the
    routed lab of build_bgp_lab instead; `lab.py down TAG DIR` removes its
    namespaces, every process in them, and the bpffs."""
    import pathlib
    import sys
    if argv[:1] in (["up"], ["up-bgp"]):
        tag, work = argv[1], pathlib.Path(argv[2])
        backends = dict(a.split("=") for a in argv[3:])
        (work / "bpffs").mkdir(parents=True, exist_ok=True)
        (work / "www").mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(work / "bpffs")], check=True)
        lab = Lab(tag, exact=True)
        try:
            if argv[0] == "up":
                build_dsr_lab(lab, work / "www", backends, realserver=False)
            else:
                build_bgp_lab(lab, work, backends)
        except Exception:
            lab.close()
            raise
        return 0                # left running: `down` tears it down
    if argv[:1] == ["down"]:
        prefix = argv[1] + "-"
        names = [line.split()[0] for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.splitlines()]
        for ns in [n for n in names if n.startswith(prefix)]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], check=False)
        if len(argv) > 2 and os.path.ismount(os.path.join(argv[2], "bpffs")):
            subprocess.run(["umount", "-l", os.path.join(argv[2], "bpffs")], check=False)
        return 0
    sys.stderr.write("usage: lab.py up|up-bgp TAG DIR NAME=ADDR... | lab.py down TAG [DIR]\n")
    return 2


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
