"""Forwarding rate through real XDP on a veth pair between two namespaces.

    gen: eth0 --veth-- eth0 :bal

trafgen (netsniff-ng) in `gen` sends 60-byte TCP ACKs to the VIP as fast
as one CPU can; the balancer's XDP program forwards them with XDP_TX back
out of its eth0 to the backend's MAC; on the generator's eth0 a sink
(bench/baselines.c) counts the frames addressed to that MAC and drops
them.  The delivered rate with xvs.lb is compared, in the same run and
in the same mode, with the ceiling: a bare program doing only the L2
rewrite and XDP_TX.  Variants take turns in rounds so drift hits all.
"""
import os
import signal
import subprocess
import tempfile
import time

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _loader, _netinfo
from common import load_baselines, summary, table
from xvstest.lab import Lab, inside
from xvstest.packets import BALANCER_MAC, CLIENT_MAC, VIP, mac_for

BACKEND = "192.0.2.21"
XDP_FLAGS = {"native": 1 << 2, "generic": 1 << 1}
# Source-port and source-address bytes stepped by trafgen's dinc() with
# coprime periods, so the flows repeat after exactly their product.
# Offsets: 29 is the source address's last byte, 34 and 35 the source port.
FLOWS = {10: [(35, 0, 9)], 1000: [(34, 0, 7), (35, 0, 124)],
         104000: [(29, 1, 13), (34, 0, 63), (35, 0, 124)]}


def trafgen_config(flows):
    """A trafgen packet: Ethernet/IPv4/TCP ACK to VIP:80, 60 bytes; the
    bytes FLOWS names are stepped per packet.  The IPv4 checksum is right
    for the first packet only and nobody on this path checks it."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    raw = bytes(Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src="198.51.100.1", dst=VIP)
                / TCP(sport=4096, dport=80, flags="A") / (b"\0" * 6))
    steps = {off: (lo, hi) for off, lo, hi in FLOWS[flows]}
    cells = ["dinc(%d, %d, 1)" % steps[i] if i in steps else "0x%02x" % b for i, b in enumerate(raw)]
    return "{ %s }\n" % ", ".join(cells)


class Bench(object):
    def __init__(self, lab, bpffs, work):
        self.lab, self.root, self.work = lab, os.path.join(bpffs, "forward"), work
        self.gen, self.bal = lab.add("gen"), lab.add("bal")
        lab.veth(self.gen, "eth0", self.bal, "eth0")
        lab.sh(self.gen, "ip link set eth0 address %s" % CLIENT_MAC)
        lab.sh(self.bal, "ip link set eth0 address %s" % BALANCER_MAC)
        self.base = load_baselines(bytes.fromhex(mac_for(BACKEND).replace(":", "")))
        with inside(self.gen):
            self.base.attach_xdp(b"eth0", self.base.load_func(b"sink", self.base.XDP),
                                 XDP_FLAGS["native"])
        self.ceiling = self.base.load_func(b"ceiling_tx", self.base.XDP)
        self.prog = _loader.load(self.root, {})
        with inside(self.bal):
            ifindex = _netinfo.interface("eth0")["index"]
        with _dataplane.DataPlane(self.root) as dp:
            dp.set_service(VIP, 80, "tcp", False, [{
                "address": BACKEND, "weight": 1, "mac": mac_for(BACKEND), "src_mac": BALANCER_MAC,
                "ifindex": ifindex, "vlan": 0, "tx_port": 0}])

    def close(self):
        with inside(self.bal):
            _loader.detach("eth0")
        self.prog.close()
        _loader.unpin_all(self.root)
        self.base.cleanup()

    def use(self, program, mode):
        with inside(self.bal):
            _loader.detach("eth0")
            if program == "xvs.lb":
                _loader.attach(self.prog, "eth0", mode)
            else:
                self.base.attach_xdp(b"eth0", self.ceiling, XDP_FLAGS[mode])

    def delivered(self):
        return sum(self.base["delivered"][0])

    def sent(self):
        with inside(self.gen):
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                link = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
        return link.get_attr("IFLA_STATS64")["tx_packets"]

    def rate(self, flows, seconds, warmup=1.0, attempts=3):
        """(offered, delivered) frames per second while trafgen sends flows flows."""
        cfg = os.path.join(self.work, "flows%d.cfg" % flows)
        if not os.path.exists(cfg):
            with open(cfg, "w") as f:
                f.write(trafgen_config(flows))
        for attempt in range(attempts):
            # leave the host's socket-memory sysctls and IRQ affinity alone
            p = subprocess.Popen(["ip", "netns", "exec", self.gen, "trafgen", "-o", "eth0", "-i", cfg,
                                  "-P", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            time.sleep(warmup)
            if p.poll() is None:
                break
            # trafgen 0.6.8 sometimes fails its first TX_RING flush with
            # EAGAIN right after the program on the path changed: start again
            err = p.stderr.read().decode()
            if attempt == attempts - 1:
                raise RuntimeError("trafgen exited %d times, last: %s" % (attempts, err))
        try:
            s0, n0, t0 = self.sent(), self.delivered(), time.monotonic()
            time.sleep(seconds)
            s1, n1, t1 = self.sent(), self.delivered(), time.monotonic()
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return (s1 - s0) / (t1 - t0), (n1 - n0) / (t1 - t0)


# native forwarding over the ceiling (docs/design.md section 4's targets): figures to report, not tests
TARGETS = {10: 0.95, 104000: 0.90}


def run(bpffs, smoke=False, rounds=3, seconds=2.0):
    if smoke:
        rounds, seconds = 1, 0.5
    variants = [(prog, mode, flows) for mode in ("native", "generic")
                for prog, flows in [("ceiling", 10)] + [("xvs.lb", f) for f in sorted(FLOWS)]]
    rates = {v: [] for v in variants}
    offered = {v: [] for v in variants}
    with Lab("xb") as lab, tempfile.TemporaryDirectory(prefix="xvs-bench-") as work:
        bench = Bench(lab, bpffs, work)
        try:
            for dummy in range(rounds):
                for prog, mode, flows in variants:
                    bench.use(prog, mode)
                    sent, got = bench.rate(flows, seconds)
                    offered[(prog, mode, flows)].append(sent)
                    rates[(prog, mode, flows)].append(got)
        finally:
            bench.close()
    rows = []
    for prog, mode, flows in variants:
        s = summary(rates[(prog, mode, flows)])
        ceiling = summary(rates[("ceiling", mode, 10)])["median"]
        ratio = s["median"] / ceiling if ceiling else 0
        target = TARGETS.get(flows) if (prog, mode) == ("xvs.lb", "native") else None
        rows.append([mode, prog, flows if prog != "ceiling" else "-",
                     "%.0f" % summary(offered[(prog, mode, flows)])["median"], "%.0f" % s["median"],
                     "%.0f-%.0f" % (min(rates[(prog, mode, flows)]), max(rates[(prog, mode, flows)])),
                     "%.2f" % ratio,
                     "" if target is None else "at least %.2f: %s" % (target, "yes" if ratio >= target else "NO")])
    text = table(rows, ["mode", "program", "flows", "sent pps", "delivered pps (median)", "range",
                        "x ceiling", "target"])
    text += "\n\n%d rounds of %.1f s per variant, trafgen on one process; 60-byte frames.\n" % (
        rounds, seconds)
    return rows, text
