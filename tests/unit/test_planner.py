"""The checks and the desired-state arithmetic of the one planner, and the
state of record on disk: no root, no kernel.  What is computed here is
what every entry point (xvs_services, xvs_service, xvs_destination, the
boot restore) applies; test_services.py checks the maps it leaves."""
import json
import os
import stat

import pytest
import yaml

from ansible_collections.xvs.lb.plugins.module_utils import _planner as P, _spec as S, _state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIP = "203.0.113.10"


@pytest.mark.parametrize("fn,value,msg", [
    (S.ipv4, "203.0.113.300", "address=203.0.113.300: not an IPv4 address"),
    (S.ipv4, "2001:db8::1", "not an IPv4 address"),
    (S.ipv4, "0.0.0.0", "not a unicast IPv4 address"),
    (S.ipv4, "224.0.0.1", "not a unicast IPv4 address"),
    (S.port, 0, "address=0: must be a port number from 1 to 65535"),
    (S.port, 65536, "must be a port number"),
    (S.port, True, "must be a port number"),
    (S.weight, -1, "must be an integer from 0 to 65535"),
    (S.weight, 65536, "must be an integer from 0 to 65535"),
    (S.mac, "02:00:00:00:00", "not a MAC address"),
    (S.mac, "01:00:5e:00:00:01", "not a unicast MAC address"),
    (S.mac, "00:00:00:00:00:00", "not a unicast MAC address"),
    (S.protocol, "sctp", "must be one of tcp, udp"),
])
def test_validators_name_option_and_value(fn, value, msg):
    with pytest.raises(S.XvsError, match=msg.replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)")):
        fn("address", value)


def test_validators_normalise():
    assert S.ipv4("a", " 203.0.113.10".strip()) == VIP
    assert S.mac("m", "02:AB:00:00:00:01") == "02:ab:00:00:00:01"
    assert S.port("p", 80) == 80 and S.weight("w", 0) == 0


@pytest.mark.parametrize("root", ["relative/path", '/run/x"y', "/run/a\\b"])
def test_bpffs_must_be_plain_absolute(root):
    with pytest.raises(S.XvsError, match="bpffs="):
        S.bpffs(root)


@pytest.mark.parametrize("vlans,msg", [({0: "192.0.2.0/24"}, "not a VLAN id"),
                                       ({"x": "192.0.2.0/24"}, "not a VLAN id"),
                                       ({4095: "192.0.2.0/24"}, "not a VLAN id"),
                                       ({10: "192.0.2.300/24"}, "not an IPv4 prefix"),
                                       ({10: "0.0.0.0/0"}, "not an on-link prefix")])
def test_bad_vlans(vlans, msg):
    with pytest.raises(S.XvsError, match=msg):
        S.vlans(vlans)


def svc(port=80, dests=(("192.0.2.21", 1),), **kw):
    out = {"address": VIP, "port": port,
           "destinations": [dict({"address": a}, **({"weight": w} if w is not None else {}))
                            for a, w in dests]}
    out.update(kw)
    return out


def desired(*services):
    return P.from_config(list(services))


@pytest.mark.parametrize("config,msg", [
    ([svc(), svc()], r"config\[1\]: service 203.0.113.10:80/tcp listed more than once"),
    ([svc(), svc(port=70000)], r"config\[1\].port=70000: must be a port number"),
    ([svc(address="vip")], r"config\[0\].address=vip: not an IPv4 or IPv6 address"),
    ([svc(dests=[("192.0.2.21", 1), ("192.0.2.22", -1)])],
     r"config\[0\].destinations\[1\].weight=-1: must be an integer"),
    ([svc(dests=[("192.0.2.21", 1), ("192.0.2.21", 2)])],
     r"config\[0\].destinations\[1\].address=192.0.2.21: listed more than once"),
    ([svc(protocol="sctp")], r"config\[0\].protocol=sctp: must be one of"),
    ([svc(sticky="often")], r"config\[0\].sticky=often: must be true or false"),
    ([dict(svc(), colour="red")], r"config\[0\]: unknown option\(s\) colour"),
    ([{"port": 80}], r"config\[0\].address: required"),
    ([svc(destinations=[{"address": "192.0.2.21", "mac": "01:00:5e:00:00:01"}])],
     r"config\[0\].destinations\[0\].mac=01:00:5e:00:00:01: not a unicast MAC"),
    ([svc(forwarding="gre")], r"config\[0\].forwarding=gre: must be one of l2, ipip, gue"),
    ([svc(address="2001:db8::10", dests=[("192.0.2.21", 1)])],
     r"config\[0\].destinations\[0\].address=192.0.2.21: an IPv4 destination for the IPv6 VIP 2001:db8::10"),
    ([svc(dests=[("2001:db8::21", 1)])], r"an IPv6 destination for the IPv4 VIP 203.0.113.10"),
    ([svc(address="fe80::1", dests=[])], r"config\[0\].address=fe80::1: not a unicast IPv6 address"),
    ([svc(address="::ffff:192.0.2.1", dests=[])], r"not a unicast IPv6 address"),
    ([svc(address="ff02::1", dests=[])], r"not a unicast IPv6 address"),
    ([svc(forwarding="ipip", gue_port=6080)], r"config\[0\].gue_port: only for forwarding gue, not ipip"),
    ([svc(forwarding="gue", gue_port=0)], r"config\[0\].gue_port=0: must be a port number"),
])
def test_config_errors_name_entry_option_and_value(config, msg):
    with pytest.raises(S.XvsError, match=msg):
        S.services(config)


BEFORE = [svc(80, [("192.0.2.21", 1), ("192.0.2.22", 3)], sticky=True), svc(81)]


def test_merged_sets_listed_keeps_the_rest():
    before = desired(*BEFORE)
    entries = S.services([svc(80, [("192.0.2.22", None), ("192.0.2.23", None)]),
                          svc(82, [("192.0.2.24", 0)])])
    after = P.to_config(P.merged(before, entries))
    assert after == [
        {"address": VIP, "port": 80, "protocol": "tcp", "sticky": True,   # left out: kept
         "destinations": [{"address": "192.0.2.21", "weight": 1},           # unlisted: kept
                          {"address": "192.0.2.22", "weight": 3},           # weight left out: kept
                          {"address": "192.0.2.23", "weight": 1}]},         # new: default 1
        {"address": VIP, "port": 81, "protocol": "tcp", "sticky": False,
         "destinations": [{"address": "192.0.2.21", "weight": 1}]},
        {"address": VIP, "port": 82, "protocol": "tcp", "sticky": False,
         "destinations": [{"address": "192.0.2.24", "weight": 0}]}]


def test_replaced_and_overridden():
    before = desired(*BEFORE)
    entries = S.services([svc(80, [("192.0.2.22", None)])])
    replaced = P.to_config(P.replaced(before, entries))
    assert replaced[0] == {"address": VIP, "port": 80, "protocol": "tcp", "sticky": False,
                           "destinations": [{"address": "192.0.2.22", "weight": 1}]}
    assert replaced[1]["port"] == 81                        # unlisted: untouched
    assert P.to_config(P.overridden(before, entries)) == replaced[:1]


def test_deleted_listed_or_all():
    before = desired(*BEFORE)
    assert [s["port"] for s in P.to_config(P.deleted(before, S.services([svc(80)])))] == [81]
    assert P.deleted(before, {}) == {}


def test_remove_destination_and_mac_kept_by_merge():
    before = desired(svc(80, destinations=[{"address": "192.0.2.21", "mac": "02:00:00:00:00:15"},
                                           {"address": "192.0.2.22"}]))
    key = (VIP, 80, "tcp")
    after = P.remove_destination(key, "192.0.2.22")(before)
    assert list(after[key]["destinations"]) == ["192.0.2.21"]
    drained = P.merged(before, S.services([svc(80, [("192.0.2.21", 0)])]))
    assert drained[key]["destinations"]["192.0.2.21"] == {
        "address": "192.0.2.21", "weight": 0, "mac": "02:00:00:00:00:15"}


CHECK = {"type": "http", "path": "/health", "fall": 5}


def test_check_and_min_healthy_kept_by_merge_reset_by_replace():
    before = desired(svc(80, check=CHECK, min_healthy=2), svc(81))
    # merged: left out, both kept; a check given replaces the current one whole
    after = P.merged(before, S.services([svc(80, [("192.0.2.22", None)]),
                                         svc(81, check={"type": "tcp"})]))
    assert after[(VIP, 80, "tcp")]["check"] == dict(
        S.CHECK_DEFAULTS, type="http", port=None, host=None, path="/health", expect_status=200, fall=5)
    assert after[(VIP, 80, "tcp")]["min_healthy"] == 2
    assert after[(VIP, 81, "tcp")]["check"] == dict(S.CHECK_DEFAULTS, type="tcp", port=None)
    # replaced and overridden: left out, the defaults (no check, min_healthy 1)
    for transform in (P.replaced, P.overridden):
        svc80 = transform(before, S.services([svc(80)]))[(VIP, 80, "tcp")]
        assert svc80["check"] is None and svc80["min_healthy"] == S.DEFAULT_MIN_HEALTHY


def test_check_in_the_config_shape_round_trips():
    config = P.to_config(desired(svc(80, check=CHECK, min_healthy=2), svc(81)))
    assert config[0]["check"] == {"type": "http", "path": "/health", "expect_status": 200, "interval": 2.0,
                                  "timeout": 1.0, "rise": 2, "fall": 5}
    assert config[0]["min_healthy"] == 2
    assert "check" not in config[1] and "min_healthy" not in config[1]
    assert P.to_config(P.from_config(config)) == config


def test_forwarding_kept_by_merge_reset_by_replace():
    before = desired(svc(80, forwarding="gue", gue_port=7000), svc(81, forwarding="ipip"), svc(82))
    key = (VIP, 80, "tcp")
    kept = P.merged(before, S.services([svc(80, [("192.0.2.22", None)])]))[key]
    assert kept["forwarding"] == {"method": "gue", "gue_port": 7000}
    moved = P.merged(before, S.services([svc(80, gue_port=7001)]))[key]
    assert moved["forwarding"] == {"method": "gue", "gue_port": 7001}   # port alone: still gue
    l2 = P.merged(before, S.services([svc(80, forwarding="l2")]))[key]
    assert l2["forwarding"] == {"method": "l2"}           # the port goes with gue
    gue = P.merged(before, S.services([svc(81, forwarding="gue")]))[(VIP, 81, "tcp")]
    assert gue["forwarding"] == {"method": "gue", "gue_port": S.DEFAULT_GUE_PORT}
    with pytest.raises(S.XvsError, match=r"config\[0\].gue_port: only for forwarding gue, not ipip"):
        P.merged(before, S.services([svc(81, gue_port=7000)]))
    for transform in (P.replaced, P.overridden):
        svc80 = transform(before, S.services([svc(80)]))[key]
        assert svc80["forwarding"] == {"method": "l2"}
    config = P.to_config(before)
    assert [(c.get("forwarding"), c.get("gue_port")) for c in config] == \
        [("gue", 7000), ("ipip", None), (None, None)]
    assert P.to_config(P.from_config(config)) == config


def test_ipv6_services_sort_after_ipv4_and_normalise():
    config = P.to_config(desired(svc(80, address="2001:DB8:0::10", dests=[("2001:db8::22", 1), ("2001:db8::3", 2)]),
                                 svc(80)))
    assert [c["address"] for c in config] == [VIP, "2001:db8::10"]
    assert [d["address"] for d in config[1]["destinations"]] == ["2001:db8::3", "2001:db8::22"]
    assert P.to_config(P.from_config(config)) == config


def test_config_round_trip_is_exact():
    config = P.to_config(desired(*BEFORE))
    assert P.to_config(P.from_config(config)) == config
    assert P.overridden(P.from_config(config), S.services(config)) == P.from_config(config)


def test_labels_point_into_the_input():
    entries = S.services([svc(81), svc(80, [("192.0.2.21", 1), ("192.0.2.22", 1)])])
    assert P.labels(entries)[((VIP, 80, "tcp"), "192.0.2.22")] == "config[1].destinations[1].address"


# ---- the state of record on disk -----------------------------------------------
def test_record_saved_atomically_root_only(tmp_path):
    path = str(tmp_path / "etc" / "state.json")
    rec = _state.make("/run/x/lb", None, P.to_config(desired(*BEFORE)))
    _state.save(path, rec)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert _state.load(path, "/run/x/lb") == rec
    assert os.listdir(os.path.dirname(path)) == ["state.json"]    # no temporary left


@pytest.mark.parametrize("text,msg", [
    ("{not json", "not a valid state of record"),
    ('{"format": 2, "services": []}', "not an xvs.lb state of record of format 1"),
    ('{"format": 1, "services": {}, "attach": null}', r"not a valid state of record \(services must be a list"),
    ("[]", "not an xvs.lb state of record"),
])
def test_corrupt_record_refused(tmp_path, text, msg):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(S.XvsError, match="state_file=%s: %s" % (path, msg)):
        _state.load(str(path))


def test_missing_record(tmp_path):
    assert _state.load(str(tmp_path / "none.json")) is None
    with pytest.raises(S.XvsError, match="cannot read the state of record"):
        _state.load(str(tmp_path / "none.json"), required=True)


def test_record_of_another_pin_root_refused(tmp_path):
    path = str(tmp_path / "state.json")
    _state.save(path, _state.make("/run/a/lb", None, P.to_config(desired(svc()))))
    with pytest.raises(S.XvsError, match="records the balancer pinned at bpffs=/run/a/lb, not /run/b/lb"):
        _state.load(path, "/run/b/lb")
    _state.save(path, _state.make("/run/a/lb", None, []))      # an empty record: free to take
    assert _state.load(path, "/run/b/lb")["services"] == []


def test_round_one_role_file_is_no_record(tmp_path):
    """The xvs role's own state.json from before the state of record held
    only its variables: it is replaced, the maps being the better record."""
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"attach": {"interfaces": ["eth0"]}, "services": [], "purge": True}))
    assert _state.load(str(path)) is None


# ---- one place for each option ----------------------------------------------------
def _strip(spec):
    keep = ("type", "required", "choices", "elements")
    return dict((name, dict((k, v) for k, v in o.items() if k in keep)) for name, o in spec.items())


def test_role_argument_specs_match_the_modules():
    """The role's xvs_services entries are xvs_services' config: same
    options, types and choices as _spec defines once."""
    with open(os.path.join(ROOT, "roles", "xvs", "meta", "argument_specs.yml")) as f:
        role = yaml.safe_load(f)["argument_specs"]["main"]["options"]["xvs_services"]["options"]
    assert _strip(role) == _strip(S.SERVICE_OPTIONS)
    assert _strip(role["destinations"]["options"]) == _strip(S.DESTINATION_OPTIONS)
    assert _strip(role["check"]["options"]) == _strip(S.CHECK_OPTIONS)
    assert role["protocol"]["default"] == S.DEFAULT_PROTOCOL
