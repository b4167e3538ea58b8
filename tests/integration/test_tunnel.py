"""Layer-3 DSR end to end (docs/design.md §2.13, §2.14): the client and the
balancer on one segment, three backends on another behind a router.  The
xvs role tunnels to them (ipip: IPv4 in IPv4 and IPv6 in IPv6; gue: over
either)
and the realserver role's XDP decapsulator undoes the tunnel; curl reaches
every backend, replies go
from the backends to the client without the balancer, path-MTU discovery
works through the tunnel, drain and remove behave as for layer 2, and the
decapsulator comes back from its boot restore."""
import json
import os
import socket

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _decap, _loader
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane
from xvstest.lab import (BACK6, BALANCER, BIG, ECHO_PORT, FRONT6, VIP, VIP6, Lab, build_routed_lab, echo_connect,
                         inside, v6)
from xvstest.modules import Modules, changed, playbook, start_role

BACKENDS = {"web1": "198.51.100.21", "web2": "198.51.100.22", "web3": "198.51.100.23"}


class Fleet(object):
    """The balancer's and the backends' role variables and pins."""

    def __init__(self, lab, bpffs, work, forwarding, family):
        self.lab, self.work, self.forwarding, self.family = lab, work, forwarding, family
        self.vip = VIP6 if family == 6 else VIP
        self.root = os.path.join(bpffs, "tun-bal")
        self.state_file = str(work / "bal" / "state.json")
        dests = [{"address": self.address(s)} for s in sorted(BACKENDS)]
        self.bal_vars = {
            "xvs_interfaces": ["eth0"], "xvs_bpffs": self.root, "xvs_install_packages": False,
            "xvs_restore_at_boot": False, "xvs_agent": False, "xvs_cli": False, "xvs_purge_services": True,
            "xvs_sizes": {"flow_table_size": 65536, "flow_table_size_v6": 65536, "max_services": 8},
            "xvs_state_dir": str(work / "bal"), "xvs_lib_dir": str(work / "bal" / "lib"),
            "xvs_services": [{"address": self.vip, "port": port, "forwarding": self.method(port), "destinations": dests}
                             for port in (80, ECHO_PORT)]}
        self.decap_roots = {}
        self.rs_vars = {}
        for short in BACKENDS:
            d = work / short
            self.decap_roots[short] = os.path.join(bpffs, "tun-" + short)
            self.rs_vars[short] = {
                "realserver_vips": [self.vip], "realserver_decap_method": "xdp",
                "realserver_decap": sorted({self.method(80), self.method(ECHO_PORT)}),
                "realserver_decap_interfaces": ["eth0"],
                "realserver_decap_sources": [v6(FRONT6, BALANCER) if family == 6 else BALANCER],
                "realserver_decap_bpffs": self.decap_roots[short], "realserver_install_packages": False,
                "realserver_decap_config_file": str(d / "decap.json"), "realserver_lib_dir": str(d / "lib"),
                "realserver_sysctl_file": str(d / "sysctl.conf"), "realserver_systemd_dir": str(d)}
        self.books = {role: playbook(work, role) for role in ("xvs", "realserver")}

    def method(self, port):
        """The forwarding of the service on port: the fleet's, or with
        "mixed" ipip for HTTP and gue for the echo service, so each backend
        undoes both tunnels at once."""
        return {80: "ipip", ECHO_PORT: "gue"}[port] if self.forwarding == "mixed" else self.forwarding

    def roles(self):
        """Both roles, the backends' at once: their changed counts."""
        procs = [start_role(self.lab.name("bal"), self.books["xvs"], self.bal_vars)]
        procs += [start_role(self.lab.name(s), self.books["realserver"], self.rs_vars[s]) for s in BACKENDS]
        return changed(procs)

    def address(self, short):
        """Backend short's address in the fleet's family."""
        return v6(BACK6, BACKENDS[short]) if self.family == 6 else BACKENDS[short]

    def curl(self, path, port, timeout=3):
        """GET path through the VIP from the client's source port: the body, or why not."""
        r = self.lab.sh(self.lab.name("cli"), "curl -%d -sg --max-time %d --local-port %d http://%s/%s"
                        % (self.family, timeout, port, "[%s]" % self.vip if self.family == 6 else self.vip,
                           path), check=False)
        return r.stdout if r.returncode == 0 else "failed (%d)" % r.returncode

    def counters(self):
        with DataPlane(self.root) as dp:
            return dp.counters()

    def close(self):
        with inside(self.lab.name("bal")):
            _loader.detach("eth0")
        _loader.unpin_all(self.root)
        for root in self.decap_roots.values():
            _decap.remove(root)


@pytest.fixture
def fleet(request, bpffs, tmp_path):
    with Lab("xt") as lab:
        for short in ["bal"] + list(BACKENDS):
            (tmp_path / short).mkdir()
        build_routed_lab(lab, tmp_path, BACKENDS)
        f = Fleet(lab, bpffs, tmp_path, *request.param)
        try:
            yield f
        finally:
            f.close()


def assert_kernel_accepts_gue(fleet):
    """With web1's decapsulator gone, a plain UDP socket on the GUE port
    there receives the tunnel's datagrams: the kernel (as its fou would)
    checked their UDP checksum, which over IPv6 is summed over each
    datagram, and delivers only those that pass."""
    family = socket.AF_INET6 if fleet.family == 6 else socket.AF_INET
    with inside(fleet.lab.name("web1")):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((fleet.address("web1"), 6080))
        sock.settimeout(0.2)
        for i in range(9):                # about a third of the flows are web1's, and fail
            fleet.curl("whoami", 25000 + i, timeout=1)
        got = []
        while True:
            try:
                got.append(sock.recv(65535))
            except socket.timeout:
                break
    finally:
        sock.close()
    assert got, "no GUE datagram reached web1's socket"
    inner = got[0]
    assert inner[0] >> 4 == fleet.family      # GUE variant 1: the client's packet, whole
    if fleet.family == 6:
        assert inner[24:40] == socket.inet_pton(socket.AF_INET6, fleet.vip)
    else:
        assert inner[16:20] == socket.inet_aton(fleet.vip)


@pytest.mark.parametrize("fleet", [("ipip", 4), ("gue", 4), ("ipip", 6), ("gue", 6)], indirect=True,
                         ids=["ipip", "gue", "ip6ip6", "gue6"])
def test_routed_backends_through_the_tunnel(fleet):
    lab, forwarding = fleet.lab, fleet.forwarding
    assert all(n > 0 for n in fleet.roles())
    assert fleet.roles() == [0, 0, 0, 0]          # idempotent, decapsulators included

    answers = [fleet.curl("whoami", 21000 + i) for i in range(30)]
    assert sorted(set(answers)) == sorted(BACKENDS), answers
    for short, root in fleet.decap_roots.items():
        assert _decap.counters(root)["decap_" + forwarding] > 0, short

    # replies bypass the balancer: it sees the requests, not the downloads
    before = fleet.counters()
    fetched = sum(len(fleet.curl("big", 22000 + i, timeout=5)) for i in range(4))
    after = fleet.counters()
    assert fetched == 4 * BIG
    assert after["rx_bytes"] - before["rx_bytes"] < fetched / 10
    assert after["encap_" + forwarding] > before["encap_" + forwarding]

    # a segment too big for the tunnel gets frag-needed (Packet Too Big) and the client resends smaller
    s, f, backend = echo_connect(lab.name("cli"), vip=fleet.vip)
    try:
        line = b"m" * 6000 + b"\n"
        s.sendall(line)
        assert f.readline() == line
    finally:
        f.close()
        s.close()
    assert fleet.counters()["icmp_too_big"] > after["icmp_too_big"]

    # web1 reboots: XDP and the pins are gone; its boot command brings the decapsulator back
    web1 = fleet.decap_roots["web1"]
    with inside(lab.name("web1")):
        _loader.detach("eth0")
    _decap.remove(web1)
    if forwarding == "gue":
        assert_kernel_accepts_gue(fleet)
    assert os.path.exists(fleet.rs_vars["web1"]["realserver_decap_config_file"])
    with open(os.path.join(fleet.rs_vars["web1"]["realserver_systemd_dir"], "xvs-realserver.service")) as unit:
        boot = [line.split("=", 1)[1] for line in unit.read().splitlines() if "xvs-decap " in line]
    assert len(boot) == 1
    r = lab.sh(lab.name("web1"), boot[0], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(set(fleet.curl("whoami", 23000 + i) for i in range(30))) == sorted(BACKENDS)

    # drain web1, then remove it: as for layer 2
    mods = Modules(lab.name("bal"), fleet.root)
    mods.state_file = fleet.state_file
    try:
        for step, args in enumerate(({"weight": 0}, {"state": "absent"})):
            rc, res = mods.call("xvs_destination", dict(
                {"service_address": fleet.vip, "service_port": 80, "address": fleet.address("web1")}, **args))
            assert rc == 0 and res["changed"], res
            got = set(fleet.curl("whoami", 24000 + 100 * step + i) for i in range(30))
            assert got == {"web2", "web3"}, got
    finally:
        mods.close()


@pytest.mark.parametrize("fleet", [("mixed", 4), ("mixed", 6)], indirect=True, ids=["ipv4", "ipv6"])
def test_one_backend_serves_an_ipip_and_a_gue_service(fleet):
    """realserver_decap: [ipip, gue] on every backend: HTTP tunnelled with
    ipip and the echo service with gue reach all three through one XDP
    decapsulator each, and its boot restore keeps both."""
    assert all(n > 0 for n in fleet.roles())
    assert fleet.roles() == [0, 0, 0, 0]
    assert sorted(set(fleet.curl("whoami", 26000 + i) for i in range(30))) == sorted(BACKENDS)
    echoed = set()
    for i in range(30):
        s, f, backend = echo_connect(fleet.lab.name("cli"), vip=fleet.vip)
        try:
            s.sendall(b"ping\n")
            assert f.readline() == b"ping\n"
            echoed.add(backend)
        finally:
            f.close()
            s.close()
    assert echoed == set(BACKENDS)
    before = fleet.counters()
    for short, root in fleet.decap_roots.items():
        c = _decap.counters(root)
        assert c["decap_ipip"] > 0 and c["decap_gue"] > 0, (short, c)
    assert before["encap_ipip"] > 0 and before["encap_gue"] > 0
    with open(fleet.rs_vars["web1"]["realserver_decap_config_file"]) as f:
        assert json.load(f)["decap"] == ["ipip", "gue"]
