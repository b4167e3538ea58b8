"""Real traffic through real XDP: a client, the balancer and two backends
in network namespaces on one bridge; HTTP to the VIP reaches both backends
and the replies go straight back to the client (DSR), in native and in
generic mode."""
import os

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _dataplane, _loader, _netinfo
from xvstest.lab import BIG, VIP, curl, dsr_lab, inside
from xvstest.packets import TEST_SIZES

BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22"}


@pytest.fixture
def lab(tmp_path):
    with dsr_lab("xe", tmp_path, BACKENDS) as lab:
        yield lab


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


def get(lab, path, port):
    r = curl(lab, path, port)
    assert r.returncode == 0, "curl from port %d failed (%d): %s" % (port, r.returncode, r.stderr)
    return r.stdout


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_http_through_vip_reaches_both_backends_and_replies_bypass_balancer(lab, bpffs, mode):
    root = os.path.join(bpffs, "e2e_" + mode)
    bal = lab.name("bal")
    try:
        with inside(bal):
            assert configure(root, mode) == mode
            assert _netinfo.interface("eth0")["xdp_mode"] == mode

        answers = [get(lab, "whoami", 20000 + i) for i in range(24)]
        assert set(answers) == set(BACKENDS)

        with inside(bal), _dataplane.DataPlane(root) as dp:
            before = dp.counters()
        fetched = sum(len(get(lab, "big", 30000 + i)) for i in range(4))
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
