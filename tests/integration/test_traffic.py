"""Real traffic through real XDP: a client, the balancer and two backends
in network namespaces on one bridge; HTTP to the VIP reaches both backends
and the replies go straight back to the client (DSR), in native and in
generic mode."""
import os

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _loader, _netinfo
from xvstest.lab import Lab, inside, wait_for
from xvstest.packets import TEST_SIZES

VIP = "203.0.113.10"
CLIENT = "192.0.2.10"
BALANCER = "192.0.2.2"
BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22"}
BIG = 256 * 1024  # bytes per reply: DSR keeps them off the balancer


@pytest.fixture
def lab(tmp_path):
    with Lab("xe") as lab:
        sw = lab.add("sw")
        lab.sh(sw, "ip link add br0 type bridge && ip link set br0 up")
        hosts = {"cli": CLIENT, "bal": BALANCER}
        hosts.update(BACKENDS)
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
        for short in BACKENDS:
            ns = lab.name(short)
            lab.sh(ns, "ip addr add %s/32 dev lo && sysctl -qw net.ipv4.conf.all.arp_ignore=1 "
                       "net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.eth0.arp_ignore=1 "
                       "net.ipv4.conf.eth0.arp_announce=2" % VIP)
            www = tmp_path / short
            www.mkdir()
            (www / "whoami").write_text(short)
            (www / "big").write_bytes(b"x" * BIG)
            lab.bg(ns, "/usr/bin/python3 -m http.server 80 --bind 0.0.0.0 --directory %s" % www)
        for short in BACKENDS:
            wait_for(lambda: lab.sh(lab.name(short), "curl -sf -o /dev/null http://127.0.0.1/whoami",
                                    check=False).returncode == 0, what="http server in " + short)
        yield lab


def xdp_pass_on_peer(lab):
    """Native XDP_TX on a veth needs an XDP program on the peer to take the
    frames (DESIGN.md section 5): give the switch side an XDP_PASS one."""
    from bcc import BPF
    b = BPF(text=b"int pass(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = b.load_func(b"pass", BPF.XDP)
    with inside(lab.name("sw")):
        BPF.attach_xdp(b"p-bal", fn, _loader.XDP_FLAGS["native"])
    b.cleanup()


def configure(root, mode):
    """Load, attach and set the service the way the modules will."""
    prog = _loader.load(root, TEST_SIZES)
    try:
        got = _loader.attach(prog, "eth0", mode)
        dests = []
        for addr in BACKENDS.values():
            info, vlan = _netinfo.locate(addr, ["eth0"])
            dests.append({"address": addr, "weight": 1, "mac": _netinfo.resolve_mac(addr, info),
                          "src_mac": info["mac"], "ifindex": info["index"], "vlan": vlan,
                          "tx_port": 0})
        with _dataplane.DataPlane(root) as dp:
            dp.set_service(VIP, 80, "tcp", False, dests)
    finally:
        prog.close()
    return got


def curl(lab, path, port):
    r = lab.sh(lab.name("cli"), "curl -s --max-time 5 --local-port %d http://%s/%s" % (port, VIP, path),
               check=False)
    assert r.returncode == 0, "curl from port %d failed (%d): %s" % (port, r.returncode, r.stderr)
    return r.stdout


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_http_through_vip_reaches_both_backends_and_replies_bypass_balancer(lab, bpffs, mode):
    root = os.path.join(bpffs, "e2e_" + mode)
    bal = lab.name("bal")
    try:
        if mode == "native":
            xdp_pass_on_peer(lab)
        with inside(bal):
            assert configure(root, mode) == mode
            assert _netinfo.interface("eth0")["xdp_mode"] == mode

        answers = [curl(lab, "whoami", 20000 + i) for i in range(24)]
        assert set(answers) == set(BACKENDS)

        with inside(bal), _dataplane.DataPlane(root) as dp:
            before = dp.counters()
        fetched = sum(len(curl(lab, "big", 30000 + i)) for i in range(4))
        assert fetched == 4 * BIG
        with inside(bal), _dataplane.DataPlane(root) as dp:
            after = dp.counters()
            svc = dp.service(VIP, 80, "tcp")
            per_dest = {d["address"]: dp.dest_stats(svc["index"], d["slot"])
                        for d in svc["destinations"]}
        # The requests crossed the balancer (and were forwarded by XDP)...
        assert after["tx"] > before["tx"]
        assert after["new_flows"] - before["new_flows"] == 4
        assert all(s["new_flows"] > 0 for s in per_dest.values())
        # ...the 1 MiB of replies did not: the balancer saw a small fraction.
        seen = after["rx_bytes"] - before["rx_bytes"]
        assert seen < fetched / 10, "balancer saw %d bytes of %d fetched" % (seen, fetched)
    finally:
        with inside(bal):
            _loader.detach("eth0")
            _loader.unpin_all(root)
