"""The loader: pins survive a reload of a changed program, mismatched pins
are refused, and attach/detach work in native, generic and auto mode."""
import os
import time

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _layout as L, _loader, _netinfo
from xvstest.lab import Lab, inside
from xvstest.packets import (CLIENT, TEST_SIZES, VIP, Harness, dest_of, dump_maps, expected_dest, flows,
                             harness)
from test_contract import B1, B2, SIZE, tcp
from test_contract_ipv6 import B1 as B1_6, B2 as B2_6, VIP as VIP6, owner, tcp as tcp6


def changed_source(tmp_path):
    """The collection's program with one extra, behaviour-neutral branch:
    a different program (new tag) over the same maps."""
    text = open(_loader.default_source()).read()
    marker = "    c->n[C_RX_PACKETS]++;\n"
    assert marker in text
    text = text.replace(marker, "    if (ctx->rx_queue_index == 0xfffffff0)\n"
                                "        return XDP_ABORTED;\n" + marker, 1)
    path = tmp_path / "xdp_lb_v2.c"
    path.write_text(text)
    return str(path)


def test_reload_keeps_services_counters_and_live_flows(pin_root, tmp_path):
    dests = [(B1, 1), (B2, 1)]
    h = Harness(pin_root)
    try:
        h.dp.set_service(VIP, 80, "tcp", False, [h.dest(a, w) for a, w in dests])
        # a live flow pinned to the destination Maglev would NOT pick now
        sport = 43210
        other = B2 if expected_dest(dests, SIZE, CLIENT, VIP, sport, 80) == B1 else B1
        svc = h.dp.service(VIP, 80, "tcp")
        slot = [d["slot"] for d in svc["destinations"] if d["address"] == other][0]
        key = L.FlowKey(saddr=L.be32(CLIENT), daddr=L.be32(VIP), sport=L.be16(sport),
                        dport=L.be16(80), proto=6)
        val = L.FlowVal(last_seen=time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                        svc_index=svc["index"], dest_slot=slot, dest_addr=L.be32(other))
        h.dp.maps["flows"].update(bytes(key), bytes(val))
        assert dest_of(h.run(tcp(sport=sport, flags="A"))[1]) == other
        # and an IPv6 flow, pinned by its first packet
        h.dp.set_service(VIP6, 80, "tcp", False, [h.dest(B1_6), h.dest(B2_6)])
        owner6 = owner(h.run(tcp6(sport=sport))[1])
        h.dp.set_service(VIP6, 80, "tcp", False, [h.dest(B1_6), h.dest(B2_6), h.dest("2001:db8::23", 9)])
        services_before = h.dp.services()
        counters_before = h.counters()
        old_info = h.prog.info
    finally:
        h.close()

    h2 = Harness(pin_root, source=changed_source(tmp_path))
    try:
        assert h2.prog.info["tag"] != old_info["tag"]
        assert _loader.pinned_prog_id(pin_root) == h2.prog.info["id"]
        assert h2.dp.services() == services_before
        assert h2.counters() == counters_before
        verdict, out = h2.run(tcp(sport=sport, flags="A"))
        assert (verdict, dest_of(out)) == ("tx", other)
        assert owner(h2.run(tcp6(sport=sport, flags="A"))[1]) == owner6
        assert h2.counters()["rx_packets"] == counters_before["rx_packets"] + 2
        assert h2.counters()["new_flows"] == counters_before["new_flows"]
    finally:
        h2.close()


def test_size_change_refused_with_state_untouched(pin_root):
    with harness(pin_root) as h:
        h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1)])
        h.run(tcp())
        before = dump_maps(pin_root)
        prog_id = _loader.pinned_prog_id(pin_root)
    with pytest.raises(_loader.LoaderError, match=r"flow_table_size=8192 \(now 4096\): changes the pinned flows map.*allow the flow"):
        _loader.load(pin_root, dict(TEST_SIZES, flow_table_size=8192))
    with pytest.raises(_loader.LoaderError, match=r"max_services=16 \(now 8\): changes the pinned vips, services, .* maps"):
        _loader.load(pin_root, dict(TEST_SIZES, max_services=16))
    assert dump_maps(pin_root) == before
    assert _loader.pinned_prog_id(pin_root) == prog_id


@pytest.mark.parametrize("change", [{"flow_table_size": 8192}, {"max_services": 16},
                                    {"max_destinations": 4, "maglev_table_size": 257}])
def test_resize_when_allowed_keeps_configuration(pin_root, change):
    with harness(pin_root) as h:
        h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1), h.dest(B2, 2)])
        h.dp.set_service(VIP, 53, "udp", True, [h.dest(B2, 1)])
        h.dp.set_service(VIP6, 80, "tcp", False, [h.dest(B1_6)])
        h.dp.set_service(VIP, 82, "tcp", False, [dict(h.dest("198.51.100.21"), mac="02:00:00:00:00:fe",
                                                      tun_src="192.0.2.2", mtu=1500)],
                         {"method": "gue", "gue_port": 7000})
        h.run(tcp())
        services = h.dp.services()
        assert {(s["port"], s["forwarding"]["method"]) for s in services} == {(80, "l2"), (53, "l2"), (82, "gue")}
    with harness(pin_root, sizes=dict(change), allow_flow_reset=True) as h:
        assert flows(h.dp) == []
        assert h.dp.services() == services
        assert h.dp.maps["flows"].max_entries == change.get("flow_table_size", 4096)
        verdict, out = h.run(tcp(sport=50505))
        want = expected_dest([(B1, 1), (B2, 2)], change.get("maglev_table_size", SIZE),
                             CLIENT, VIP, 50505, 80)
        assert (verdict, dest_of(out)) == ("tx", want)


def test_resize_that_does_not_fit_refused(pin_root):
    with harness(pin_root) as h:
        h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1), h.dest(B2, 2)])
        before = dump_maps(pin_root)
    with pytest.raises(_loader.LoaderError, match="max_destinations=1: service 203.0.113.10:80/tcp"):
        _loader.load(pin_root, dict(TEST_SIZES, max_destinations=1), allow_flow_reset=True)
    assert dump_maps(pin_root) == before


def test_map_of_another_program_version_refused(pin_root, bpffs):
    from bcc import BPF
    os.makedirs(pin_root)
    b = BPF(text=('BPF_TABLE_PINNED("hash", u32, u32, services, 8, "%s/services");'
                  'int f(struct xdp_md *c) { u32 k = 0; services.lookup(&k); return XDP_PASS; }'
                  % pin_root).encode())
    b.load_func(b"f", BPF.XDP)
    b.cleanup()
    with pytest.raises(Exception, match="incompatible program version"):
        _loader.load(pin_root, TEST_SIZES)


def test_maps_of_an_older_abi_refused_with_the_way_out(pin_root):
    """An upgrade over a running balancer: the pins say ABI 1 (this meta
    layout is shared by every ABI), so the loader names the versions and
    the remedy, and changes nothing."""
    with harness(pin_root) as h:
        h.dp.set_service(VIP, 80, "tcp", False, [h.dest(B1, 1)])
        meta = L.Meta.from_buffer_copy(h.dp.maps["meta"].lookup(bytes(L.U32(0))))
        meta.abi_version = L.ABI_VERSION - 1
        h.dp.maps["meta"].update(bytes(L.U32(0)), bytes(meta))
        prog_id = _loader.pinned_prog_id(pin_root)
    before = dump_maps(pin_root)
    refusal = r"ABI %d and this version of xvs.lb needs ABI %d: .*Remove them \(rm -r %s" % (
        L.ABI_VERSION - 1, L.ABI_VERSION, pin_root)
    with pytest.raises(_loader.LoaderError, match=refusal):
        _loader.load(pin_root, TEST_SIZES)
    # what xvs_attach and every other module read first says the same
    for read in (_loader.status, _dataplane.DataPlane):
        with pytest.raises(_dataplane.DataPlaneError, match=refusal):
            read(pin_root)
    assert dump_maps(pin_root) == before
    assert _loader.pinned_prog_id(pin_root) == prog_id


def test_pin_root_must_be_on_bpffs(tmp_path):
    with pytest.raises(_loader.LoaderError, match="not on a mounted bpf filesystem"):
        _loader.load(str(tmp_path / "xvs"), TEST_SIZES)


@pytest.mark.parametrize("bad", [{"maglev_table_size": 1000}, {"max_services": 0},
                                 {"flow_table_size": "big"}, {"tcp_timeout": True}])
def test_bad_sizes_refused(bad):
    with pytest.raises(L.SizeError, match=list(bad)[0]):
        L.sizes(**bad)


@pytest.mark.parametrize("mode,want", [("native", "native"), ("generic", "generic"),
                                       ("auto", "native")])
def test_attach_and_detach(pin_root, mode, want):
    with Lab("xa") as lab:
        ns = lab.add("bal")
        lab.veth(ns, "lb0", ns, "lb1")
        with inside(ns), harness(pin_root) as h:
            assert _loader.attach(h.prog, "lb0", mode) == want
            info = _netinfo.interface("lb0")
            assert (info["xdp_mode"], info["xdp_prog_id"]) == (want, h.prog.info["id"])
            assert _loader.attached(pin_root, ["lb0", "lb1"]) == {"lb0": want}
            assert h.dp.tx_port(info["index"]) is not None
            assert _loader.detach("lb0") is True
            assert _netinfo.interface("lb0")["xdp_mode"] is None
            assert _loader.detach("lb0") is False


def test_attach_unknown_interface(pin_root):
    with harness(pin_root) as h:
        with pytest.raises(_netinfo.NetInfoError, match="interface nosuch0 does not exist"):
            _loader.attach(h.prog, "nosuch0")


def test_reload_swaps_program_on_attached_interfaces_in_their_mode(pin_root, tmp_path):
    with Lab("xl") as lab:
        ns = lab.add("bal")
        lab.veth(ns, "lb0", ns, "lb1")
        lab.veth(ns, "lb2", ns, "lb3")
        with inside(ns):
            prog = _loader.load(pin_root, TEST_SIZES)
            try:
                assert _loader.attach(prog, "lb0", "generic") == "generic"
                assert _loader.attach(prog, "lb2", "native") == "native"
                old_id = prog.info["id"]
            finally:
                prog.close()
            new, modes = _loader.reload(pin_root, ["lb0", "lb2"], TEST_SIZES,
                                        source=changed_source(tmp_path))
            try:
                assert modes == {"lb0": "generic", "lb2": "native"}
                assert new.info["id"] != old_id
                assert _loader.attached(pin_root, ["lb0", "lb1", "lb2"]) == modes
            finally:
                new.close()
                _loader.detach("lb0")
                _loader.detach("lb2")


def test_header_sizes_are_the_kernels():
    """The tunnels' overheads (_layout.METHODS) are sums of these; the
    compiler checks them against the structs xdp_lb.c takes sizeof of."""
    from bcc import BPF
    text = "\n".join(["#include <uapi/linux/ip.h>", "#include <uapi/linux/ipv6.h>", "#include <uapi/linux/udp.h>"] + [
        '_Static_assert(sizeof(struct %s) == %d, "%s");' % (struct, size, name)
        for struct, size, name in (("iphdr", L.IPV4_HEADER, "IPV4_HEADER"), ("ipv6hdr", L.IPV6_HEADER, "IPV6_HEADER"),
                                   ("udphdr", L.UDP_HEADER, "UDP_HEADER"))])
    BPF(text=text.encode()).cleanup()      # compiling is the test
