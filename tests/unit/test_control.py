"""Validation and planning of the modules, against a fake balancer: no root,
no kernel; what is planned is what the real run applies."""
import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _control as C, _loader

VIP = "203.0.113.10"


@pytest.mark.parametrize("fn,value,msg", [
    (C.ipv4, "203.0.113.300", "address=203.0.113.300: not an IPv4 address"),
    (C.ipv4, "2001:db8::1", "not an IPv4 address"),
    (C.ipv4, "0.0.0.0", "not a unicast IPv4 address"),
    (C.ipv4, "224.0.0.1", "not a unicast IPv4 address"),
    (C.port, 0, "address=0: must be a port number from 1 to 65535"),
    (C.port, 65536, "must be a port number"),
    (C.port, True, "must be a port number"),
    (C.weight, -1, "must be an integer from 0 to 65535"),
    (C.weight, 65536, "must be an integer from 0 to 65535"),
    (C.mac, "02:00:00:00:00", "not a MAC address"),
    (C.mac, "01:00:5e:00:00:01", "not a unicast MAC address"),
    (C.mac, "00:00:00:00:00:00", "not a unicast MAC address"),
    (C.protocol, "sctp", "must be one of tcp, udp"),
])
def test_validators_name_option_and_value(fn, value, msg):
    with pytest.raises(C.XvsError, match=msg.replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)")):
        fn("address", value)


def test_validators_normalise():
    assert C.ipv4("a", " 203.0.113.10".strip()) == VIP
    assert C.mac("m", "02:AB:00:00:00:01") == "02:ab:00:00:00:01"
    assert C.port("p", 80) == 80 and C.weight("w", 0) == 0


@pytest.mark.parametrize("root", ["relative/path", '/run/x"y', "/run/a\\b"])
def test_bpffs_must_be_plain_absolute(root):
    with pytest.raises(C.XvsError, match="bpffs="):
        C.bpffs(root)


@pytest.mark.parametrize("vlans,msg", [({0: "192.0.2.0/24"}, "not a VLAN id"),
                                       ({"x": "192.0.2.0/24"}, "not a VLAN id"),
                                       ({4095: "192.0.2.0/24"}, "not a VLAN id"),
                                       ({10: "192.0.2.300/24"}, "not an IPv4 prefix"),
                                       ({10: "0.0.0.0/0"}, "not an on-link prefix")])
def test_bad_vlans(vlans, msg):
    with pytest.raises(_loader.LoaderError, match=msg):
        _loader.normalise_vlans(vlans)


def test_vlans_normalised():
    assert _loader.normalise_vlans({"10": "192.0.2.2/24"}) == {10: "192.0.2.0/24"}


class FakeDP(object):
    max_dests = 4
    max_services = 2

    def __init__(self, services=()):
        self._services = list(services)
        self.writes = []

    def services(self):
        return self._services

    def service_count(self):
        return len(self._services)

    def service(self, a, p, proto):
        for s in self._services:
            if (s["address"], s["port"], s["protocol"]) == (a, p, proto):
                return s
        return None

    def set_service(self, *args):
        self.writes.append(("set",) + args)

    def delete_service(self, *args):
        self.writes.append(("delete",) + args)


class FakeBalancer(C.Balancer):
    """The real Balancer's planning with fake maps and a fake resolver."""

    def __init__(self, services=()):   # pylint: disable=super-init-not-called
        self.dp = FakeDP(services)
        self.resolved = []

    def ifname(self, index):
        return "eth%d" % index

    def resolve(self, option, address, mac_override=None):
        self.resolved.append(address)
        if address.startswith("198.51.100."):
            raise C.XvsError("%s=%s: not on-link" % (option, address))
        last = int(address.split(".")[-1])
        return {"address": address, "mac": mac_override or "02:00:00:00:00:%02x" % last,
                "src_mac": "02:00:00:00:00:01", "ifindex": 2, "vlan": 0, "tx_port": 0}


def dest(addr, weight=1):
    last = int(addr.split(".")[-1])
    return {"address": addr, "weight": weight, "mac": "02:00:00:00:00:%02x" % last,
            "src_mac": "02:00:00:00:00:01", "ifindex": 2, "vlan": 0, "tx_port": 0, "slot": 0}


def svc(dests, sticky=False, port=80):
    return {"address": VIP, "port": port, "protocol": "tcp", "sticky": sticky, "index": 0,
            "destinations": dests}


def params(**kw):
    p = dict(address=VIP, port=80, protocol="tcp", sticky=False, destinations=None,
             purge_destinations=False, state="present")
    p.update(kw)
    return p


def test_new_service_is_planned_then_applied_as_planned():
    bal = FakeBalancer()
    plan = C.plan_service(bal, params(destinations=[{"address": "192.0.2.21", "weight": 2}]))[0]
    assert plan.changed and plan.before is None
    assert plan.after["destinations"] == [{"address": "192.0.2.21", "weight": 2,
                                           "mac": "02:00:00:00:00:15", "interface": "eth2",
                                           "vlan": 0}]
    assert bal.dp.writes == []          # planning writes nothing (check mode)
    plan.apply()
    assert bal.dp.writes[0][:5] == ("set", VIP, 80, "tcp", False)


def test_same_destinations_unchanged_and_not_re_resolved():
    bal = FakeBalancer([svc([dest("192.0.2.21"), dest("192.0.2.22", 3)])])
    plan = C.plan_service(bal, params(destinations=[{"address": "192.0.2.22", "weight": 3}]))[0]
    assert not plan.changed and bal.resolved == []
    plan.apply()
    assert bal.dp.writes == []


def test_purge_removes_unlisted_only_when_asked():
    current = [svc([dest("192.0.2.21"), dest("192.0.2.22")])]
    listed = [{"address": "192.0.2.22", "weight": 1}]
    keep = C.plan_service(FakeBalancer(current), params(destinations=listed))[0]
    assert not keep.changed
    purge = C.plan_service(FakeBalancer(current),
                           params(destinations=listed, purge_destinations=True))[0]
    assert purge.changed
    assert [d["address"] for d in purge.after["destinations"]] == ["192.0.2.22"]


def test_weight_and_sticky_changes_are_changes():
    current = [svc([dest("192.0.2.21")])]
    assert C.plan_service(FakeBalancer(current), params(
        destinations=[{"address": "192.0.2.21", "weight": 0}]))[0].changed
    assert C.plan_service(FakeBalancer(current), params(sticky=True))[0].changed


@pytest.mark.parametrize("p,msg", [
    (params(address="vip"), "address=vip: not an IPv4 address"),
    (params(port=70000), "port=70000: must be a port number"),
    (params(destinations=[{"address": "192.0.2.21", "weight": 1}] * 2),
     r"destinations\[1\].address=192.0.2.21: listed more than once"),
    (params(destinations=[{"address": "198.51.100.9", "weight": 1}]),
     r"destinations\[0\].address=198.51.100.9: not on-link"),
    (params(destinations=[{"address": "192.0.2.%d" % i, "weight": 1} for i in range(1, 6)]),
     "5 destinations exceed max_destinations=4"),
])
def test_service_errors_name_option_and_value(p, msg):
    bal = FakeBalancer()
    with pytest.raises(C.XvsError, match=msg):
        C.plan_service(bal, p)
    assert bal.dp.writes == []


def test_services_limit():
    bal = FakeBalancer([svc([], port=1), svc([], port=2)])
    with pytest.raises(C.XvsError, match="all max_services=2 services are configured"):
        C.plan_service(bal, params(port=3))


def test_absent_service():
    bal = FakeBalancer([svc([dest("192.0.2.21")])])
    plan = C.plan_service(bal, params(state="absent"))[0]
    assert plan.changed and plan.after is None
    plan.apply()
    assert bal.dp.writes == [("delete", VIP, 80, "tcp")]
    assert not C.plan_service(FakeBalancer(), params(state="absent"))[0].changed


def dparams(**kw):
    p = dict(service_address=VIP, service_port=80, protocol="tcp", address="192.0.2.21",
             weight=1, mac=None, state="present")
    p.update(kw)
    return p


def test_destination_drain_remove_and_missing_service():
    current = [svc([dest("192.0.2.21"), dest("192.0.2.22")])]
    plan, addr = C.plan_destination(FakeBalancer(current), dparams(weight=0))
    assert plan.changed and addr == "192.0.2.21"
    assert [d["weight"] for d in plan.after["destinations"]] == [0, 1]
    plan = C.plan_destination(FakeBalancer(current), dparams(state="absent"))[0]
    assert [d["address"] for d in plan.after["destinations"]] == ["192.0.2.22"]
    assert not C.plan_destination(FakeBalancer(current), dparams())[0].changed
    with pytest.raises(C.XvsError, match="service_port=81 protocol=tcp: no such service"):
        C.plan_destination(FakeBalancer(current), dparams(service_port=81))


def test_destination_mac_override_re_resolves():
    current = [svc([dest("192.0.2.21")])]
    bal = FakeBalancer(current)
    plan = C.plan_destination(bal, dparams(mac="02:00:00:00:99:99"))[0]
    assert plan.changed and bal.resolved == ["192.0.2.21"]
    assert plan.after["destinations"][0]["mac"] == "02:00:00:00:99:99"
