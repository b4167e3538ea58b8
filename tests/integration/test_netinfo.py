"""netinfo against a real kernel: on-link lookup (direct and through a VLAN
of a trunk), ARP resolution with an active probe, and clear errors."""
import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _netinfo
from xvstest.lab import Lab, inside


@pytest.fixture
def pair():
    with Lab("xn") as lab:
        bal, be = lab.add("bal"), lab.add("be")
        lab.veth(bal, "eth0", be, "eth0")
        lab.sh(bal, "ip addr add 192.0.2.2/24 dev eth0")
        lab.sh(be, "ip addr add 192.0.2.21/24 dev eth0")
        yield lab, bal, be


def test_locate_and_resolve_by_probe(pair):
    lab, bal, be = pair
    backend_mac = lab.sh(be, "cat /sys/class/net/eth0/address").stdout.strip()
    with inside(bal):
        info, vlan = _netinfo.locate("192.0.2.21", ["eth0"])
        assert (info["name"], vlan) == ("eth0", 0)
        assert info["mac"] == lab.sh(bal, "cat /sys/class/net/eth0/address").stdout.strip()
        assert lab.sh(bal, "ip neigh show 192.0.2.21").stdout == ""
        # nothing in the neighbour table yet: resolve_mac must probe
        assert _netinfo.resolve_mac("192.0.2.21", info) == backend_mac


def test_locate_through_vlan_of_trunk(pair):
    bal = pair[1]
    with inside(bal):
        info, vlan = _netinfo.locate("198.51.100.40", ["eth0"], {20: "198.51.100.0/24"})
        assert (info["name"], vlan) == ("eth0", 20)


def test_not_on_link_is_a_clear_error(pair):
    bal = pair[1]
    with inside(bal):
        with pytest.raises(_netinfo.NetInfoError,
                           match=r"destination 198\.51\.100\.9 is not on-link .*\(eth0\)"):
            _netinfo.locate("198.51.100.9", ["eth0"])


def test_unresolvable_mac_is_a_clear_error(pair):
    bal = pair[1]
    with inside(bal):
        info = _netinfo.locate("192.0.2.99", ["eth0"])[0]
        with pytest.raises(_netinfo.NetInfoError,
                           match=r"cannot resolve the MAC address of 192\.0\.2\.99 on eth0"):
            _netinfo.resolve_mac("192.0.2.99", info, timeout=1.0)
