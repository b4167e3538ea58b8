"""IPv6 services end to end (docs/design.md §2.15): a client, the balancer
and three backends on one bridge with IPv6 addresses; the xvs role sets an
IPv6 service up and the realserver role puts the IPv6 VIP on the backends'
lo.  curl -6 through the VIP reaches every backend, the replies bypass the
balancer, a drain holds, and nobody answers neighbour solicitations for
the VIP (the backends hold it on lo, the balancer not at all)."""
import os
import time

from ansible_collections.xvs.lb.plugins.module_utils import _loader
from ansible_collections.xvs.lb.plugins.module_utils._dataplane import DataPlane
from xvstest.lab import BIG, VIP as VIP4, Lab, build_dsr_lab, inside
from xvstest.modules import Modules, changed, playbook, start_role

VIP = "2001:db8:100::10"
NET = "2001:db8:1::%x"
HOSTS = {"cli": 0x10, "bal": 0x2, "web1": 0x21, "web2": 0x22, "web3": 0x23}
BACKENDS = dict((short, "192.0.2.%d" % HOSTS[short]) for short in ("web1", "web2", "web3"))


def addr6(short):
    return NET % HOSTS[short]


def curl6(lab, path, port):
    r = lab.sh(lab.name("cli"), "curl -6 -sg --max-time 3 --local-port %d http://[%s]/%s" % (port, VIP, path),
               check=False)
    return r.stdout if r.returncode == 0 else "failed (%d)" % r.returncode


def test_ipv6_service_through_the_roles(bpffs, tmp_path):
    root = os.path.join(bpffs, "ipv6")
    with Lab("x6") as lab:
        build_dsr_lab(lab, tmp_path, BACKENDS, realserver=False)
        for short in HOSTS:
            lab.sh(lab.name(short), "ip -6 addr add %s/64 dev eth0 nodad" % addr6(short))
        lab.sh(lab.name("cli"), "ip -6 route add %s/128 via %s" % (VIP, addr6("bal")))
        bal_vars = {
            "xvs_interfaces": ["eth0"], "xvs_bpffs": root, "xvs_install_packages": False,
            "xvs_restore_at_boot": False, "xvs_agent": False, "xvs_cli": False, "xvs_purge_services": True,
            "xvs_sizes": {"flow_table_size": 65536, "flow_table_size_v6": 65536, "max_services": 8},
            "xvs_state_dir": str(tmp_path / "etc"), "xvs_lib_dir": str(tmp_path / "lib"),
            "xvs_services": [{"address": VIP, "port": 80,
                              "destinations": [{"address": addr6(s)} for s in sorted(BACKENDS)]}]}
        rs_vars = dict((short, {"realserver_vips": [VIP4, VIP], "realserver_persist": False})
                       for short in BACKENDS)
        try:
            def roles():
                return changed([start_role(lab.name("bal"), playbook(tmp_path, "xvs"), bal_vars)] +
                               [start_role(lab.name(s), playbook(tmp_path, "realserver"), rs_vars[s])
                                for s in BACKENDS])
            assert all(n > 0 for n in roles())
            assert roles() == [0, 0, 0, 0]
            for short in BACKENDS:
                assert "inet6 %s/128" % VIP in lab.sh(lab.name(short), "ip -6 addr show dev lo").stdout

            answers = [curl6(lab, "whoami", 21000 + i) for i in range(30)]
            assert sorted(set(answers)) == sorted(BACKENDS), answers

            with DataPlane(root) as dp:
                before = dp.counters()
                svc = dp.service(VIP, 80, "tcp")
                assert sorted(d["address"] for d in svc["destinations"]) == sorted(addr6(s) for s in BACKENDS)
            fetched = sum(len(lab.sh(lab.name("cli"), "curl -6 -sg --max-time 5 --local-port %d http://[%s]/big"
                                     % (22000 + i, VIP)).stdout) for i in range(4))
            with DataPlane(root) as dp:
                after = dp.counters()
            assert fetched == 4 * BIG
            assert after["rx_bytes"] - before["rx_bytes"] < fetched / 10      # the replies bypass it

            mods = Modules(lab.name("bal"), root)
            mods.state_file = str(tmp_path / "etc" / "state.json")
            try:
                rc, res = mods.call("xvs_destination", {"service_address": VIP, "service_port": 80,
                                                        "address": addr6("web1"), "weight": 0})
                assert rc == 0 and res["changed"], res
            finally:
                mods.close()
            assert set(curl6(lab, "whoami", 23000 + i) for i in range(30)) == {"web2", "web3"}

            # neighbour solicitations for the VIP go unanswered on the segment
            lab.sh(lab.name("cli"), "ip -6 route replace %s/128 dev eth0" % VIP)
            lab.sh(lab.name("cli"), "python3 -c \"import socket; socket.socket(socket.AF_INET6, "
                                    "socket.SOCK_DGRAM).sendto(b'x', ('%s', 9))\"" % VIP)
            time.sleep(4)
            neigh = lab.sh(lab.name("cli"), "ip -6 neigh show %s" % VIP).stdout
            assert "lladdr" not in neigh and ("FAILED" in neigh or "INCOMPLETE" in neigh), neigh
        finally:
            with inside(lab.name("bal")):
                _loader.detach("eth0")
            _loader.unpin_all(root)
