"""The Python mirror of the data plane's layout matches files/xdp_lb.c."""
import ctypes
import re

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L, _loader

C = open(_loader.default_source()).read()


def test_counter_names_match_c_enum():
    body = re.search(r"enum counter \{(.*?)\};", C, re.S).group(1)
    names = [n.strip()[2:].lower() for n in body.split(",") if n.strip()]
    assert names[-1] == "max"
    assert tuple(names[:-1]) == L.COUNTERS


def test_version_is_galaxy_ymls():
    """xvs_build_info and `xvs --version` name the release galaxy.yml builds."""
    import os
    import yaml
    with open(os.path.join(os.path.dirname(_loader.default_source()), "..", "galaxy.yml")) as f:
        assert L.VERSION == yaml.safe_load(f)["version"]


def test_verdict_counters_are_counters():
    assert set(L.VERDICT_COUNTERS) <= set(L.COUNTERS)


@pytest.mark.parametrize("struct,cname", [
    (L.SvcKey, "svc_key"), (L.SvcVal, "svc_val"), (L.VipVal, "vip_val"), (L.Dest, "dest"),
    (L.MaglevChunk, "maglev_chunk"), (L.FlowKey, "flow_key"), (L.FlowVal, "flow_val"),
    (L.Counters, "counters"), (L.Stats, "stats"), (L.Meta, "meta"), (L.VlanNet, "vlan_net"),
    (L.TunnelSrc, "tunnel_src"), (L.Addr6, "addr6"), (L.SvcKey6, "svc_key6"), (L.FlowKey6, "flow_key6"),
    (L.FlowVal6, "flow_val6")])
def test_struct_fields_in_c_order(struct, cname):
    body = re.search(r"struct %s \{(.*?)\};" % cname, C, re.S).group(1)
    fields = re.findall(r"^\s*(?:struct\s+)?\w+\s+(\w+)(?:\[\w+\])?;", body, re.M)
    assert fields == [f[0] for f in struct._fields_]


def test_abi_version_matches():
    assert int(re.search(r"#define ABI_VERSION (\d+)", C).group(1)) == L.ABI_VERSION


def test_sizes_fill_defaults_and_map_entries():
    s = L.sizes()
    assert s["maglev_table_size"] == 65537 and L.is_prime(65537)
    e = L.map_entries(s)
    assert e["maglev"] == s["max_services"] * 2 * ((65537 + 15) // 16)
    assert ctypes.sizeof(L.Dest) == 76 and ctypes.sizeof(L.FlowKey) == 16


# facts xdp_lb.c and _layout both state: each #define must equal its twin
SHARED = ("ABI_VERSION", "MAGLEV_CHUNK", "MAGLEV_HALVES", "VLAN_IDS", "SRC_PREFIX_LEN", "SRC_PREFIX6_LEN",
          "PREFIX6_ORDER", "PREFIX6_MULT", "VIP_FILTER_ORDER", "VIP_FILTER_MULT", "SVC_STICKY", "DEST_VALID",
          "DEST_V6", "DEST_FAILING", "ICMP_QUOTE_LEN", "IPV6_MIN_MTU")


def c_defines():
    """{name: int} of xdp_lb.c's #defines whose value is an integer literal."""
    return dict((name, int(value, 0)) for name, value in
                re.findall(r"^#define (\w+) +(0x[0-9a-fA-F]+|\d+)[UL]*\b", C, re.M))


def test_every_shared_define_equals_layout():
    defines = c_defines()
    want = dict((name, getattr(L, name)) for name in SHARED)
    want.update(("FWD_" + m.name.upper(), m.number) for m in L.METHODS)
    assert dict((name, defines.get(name)) for name in want) == want
    # and no other #define names a _layout constant without being compared
    twins = [n for n in defines if isinstance(getattr(L, n, None), int) and not isinstance(getattr(L, n), bool)]
    assert sorted(set(twins) - set(want)) == []
