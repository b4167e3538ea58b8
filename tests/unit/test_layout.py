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
