"""Every module's RETURN matches what it returns: each module runs for
real (a balancer namespace with the program attached, a realserver
namespace with the decapsulator), and every key of each result, nested
ones included, is documented, and every key documented as always (or on
success) returned is there.  Where a dict is documented by its sample
alone (counters), the sample names every key."""
import importlib
import os

import pytest
import yaml

from ansible_collections.xvs.lb.plugins.module_utils import _decap, _loader
from xvstest.lab import Lab, inside
from xvstest.modules import Modules, balancer_ns

VIP = "203.0.113.10"
# keys Ansible or AnsibleModule add to every result, documented by Ansible
COMMON = {"changed", "failed", "invocation", "warnings", "deprecations", "diff", "msg"}
SERVICE = {"address": VIP, "port": 80, "destinations": [{"address": "192.0.2.21"}, {"address": "192.0.2.22"}]}


def documented(module):
    m = importlib.import_module("ansible_collections.xvs.lb.plugins.modules." + module)
    return yaml.safe_load(m.RETURN)


def mismatches(doc, result, where):
    """What differs between a RETURN (or a contains) and a result dict."""
    out = []
    for key, value in result.items():
        if where.count(".") == 0 and key in COMMON:
            continue
        spec = doc.get(key)
        if spec is None:
            out.append("%s.%s is returned, not documented" % (where, key))
            continue
        out += mismatches_of(spec, value, "%s.%s" % (where, key))
    for key, spec in doc.items():
        if spec.get("returned", "always") in ("always", "success") and key not in result:
            out.append("%s.%s is documented as %s returned, not returned" % (where, key, spec.get("returned", "always")))
    return out


def mismatches_of(spec, value, where):
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if "contains" in spec:
            out += mismatches(spec["contains"], item, where)
        elif isinstance(spec.get("sample"), dict) and item and not any(isinstance(v, dict) for v in item.values()) \
                and set(spec["sample"]) <= set(item):
            # a flat dict documented by its sample alone: the sample is the list of its keys
            out += ["%s.%s is returned, not in the sample" % (where, k) for k in sorted(set(item) - set(spec["sample"]))]
    return out


@pytest.fixture
def hosts(bpffs, tmp_path):
    """A balancer namespace (bal) and a realserver namespace (rs) with
    their module runners."""
    with Lab("xd") as lab:
        bal_ns, rs_ns = balancer_ns(lab), lab.add("rs")
        lab.veth(rs_ns, "eth0", lab.add("rspeer"), "eth0")
        bal = Modules(bal_ns, os.path.join(bpffs, "docs"))      # the namespaces first: nothing to leak
        rs = Modules(rs_ns, os.path.join(bpffs, "docs-decap"))
        try:
            yield bal, rs
        finally:
            with inside(bal.ns):
                _loader.detach("eth0")
            _loader.unpin_all(bal.root)
            with inside(rs.ns):
                _decap.remove(rs.root)      # its build file in /run/xvs too
            for m in (bal, rs):
                m.close()


def run(mods, name, args, defaults=True, rc=0):
    got_rc, res = mods.call(name, args, defaults)
    assert got_rc == rc, res
    return name, res


def test_every_module_returns_what_it_documents(hosts, tmp_path):
    bal, rs = hosts
    results = [
        run(bal, "xvs_info", {}),                                   # nothing attached yet
        run(bal, "xvs_attach", {"interfaces": ["eth0"], "sizes": {"max_services": 8, "flow_table_size": 4096}}),
        run(bal, "xvs_services", {"config": [SERVICE]}),
        run(bal, "xvs_services", {"state": "gathered"}),
        run(bal, "xvs_service", {"address": VIP, "port": 81, "destinations": [{"address": "192.0.2.23"}]}),
        run(bal, "xvs_destination", {"service_address": VIP, "service_port": 80, "address": "192.0.2.22",
                                     "weight": 0, "wait_drained": {"timeout": 5, "max_flows": 0}}),
        run(bal, "xvs_services", {"config": [SERVICE], "state": "replaced",
                                  "wait_drained": {"timeout": 5, "max_flows": 0}}),
        run(bal, "xvs_maintenance", {"state": "present", "drain_timeout": 5}),
        run(bal, "xvs_info", {"source_prefixes": 2}),
        run(bal, "xvs_maintenance", {"state": "absent"}),
        run(bal, "xvs_attach", {"interfaces": ["eth0"], "state": "absent"}),
        run(rs, "xvs_decap", {"interfaces": ["eth0"], "decap": "ipip", "vips": [VIP], "mode": "generic",
                              "bpffs": rs.root, "config_file": str(tmp_path / "decap.json")}, defaults=False),
        run(rs, "xvs_realserver", {"vips": [VIP], "sysctls": {"net.ipv4.conf.all.arp_ignore": 1}}, defaults=False),
    ]
    problems = []
    for name, res in results:
        problems += mismatches(documented(name), res, name)
    assert problems == []
    assert results[0][1]["attached"] is False and results[8][1]["attached"] is True
    assert results[7][1]["maintenance"]["drain_timeout"] == 5.0 and results[8][1]["maintenance"]["in_maintenance"]
    assert results[9][1]["changed"] and results[9][1]["maintenance"] is None


def test_xvs_info_refuses_a_negative_source_prefixes(hosts):
    bal, rs = hosts
    rc, res = bal.call("xvs_info", {"source_prefixes": -3})
    assert rc == 1 and res["msg"] == "source_prefixes=-3: must be 0 or more", res


def test_xvs_maintenance_refuses_a_negative_drain_timeout_and_changes_nothing(hosts):
    bal, rs = hosts
    rc, res = bal.call("xvs_maintenance", {"drain_timeout": -1})
    assert rc == 1 and res["msg"] == "drain_timeout=-1.0: must be 0 or more seconds", res
    assert not os.path.exists(bal.state_file)
