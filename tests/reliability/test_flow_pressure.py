"""Flow-table pressure: five times more concurrent flows
than the table holds.  Every packet is still forwarded, the evictions are
counted, and a flow whose record was evicted selects the destination it
had, by the same Maglev table."""
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xvstest.packets import BALANCER_MAC, CLIENT_MAC, VIP, dest_of, expected_dest, harness

TABLE = 1024                     # the smallest flow table the loader allows
FLOWS = 5 * TABLE
DESTS = [("192.0.2.21", 1), ("192.0.2.22", 2), ("192.0.2.23", 1)]


def frame(i, flags):
    src = "198.51.100.%d" % (1 + i % 200)
    return Ether(src=CLIENT_MAC, dst=BALANCER_MAC) / IP(src=src, dst=VIP) / \
        TCP(sport=10000 + i // 200, dport=80, flags=flags)


def test_more_flows_than_the_table_holds(pin_root):
    with harness(pin_root, sizes={"flow_table_size": TABLE, "flow_table_size_v6": TABLE}) as h:
        h.dp.set_service(VIP, 80, "tcp", False, [h.dest(a, w) for a, w in DESTS])
        first = {}
        for i in range(FLOWS):
            verdict, out = h.run(frame(i, "S"))
            assert verdict == "tx"
            first[i] = dest_of(out)
        table = h.dp.flow_table()
        assert table["capacity"] == 2 * TABLE         # the IPv4 and the IPv6 table
        assert 0 < table["entries"] <= TABLE
        assert table["evicted"] == FLOWS - table["entries"]
        assert table["evicted"] >= FLOWS - TABLE

        # every flow again: most records are gone, every flow keeps its destination
        for i in range(FLOWS):
            verdict, out = h.run(frame(i, "A"))
            assert verdict == "tx" and dest_of(out) == first[i], i
        c = h.counters()
        assert c["tx"] == 2 * FLOWS and c["rx_packets"] == 2 * FLOWS
        assert c["new_flows"] > FLOWS + FLOWS // 2          # most second packets found no record
        after = h.dp.flow_table()
        assert after["evicted"] == c["new_flows"] - c["flow_reselect"] - after["entries"]
        # and the destination is the one Maglev gives: consistent, not just repeated
        for i in range(0, FLOWS, 97):
            p = frame(i, "A")
            assert first[i] == expected_dest(DESTS, 251, p[IP].src, VIP, p[TCP].sport, 80)
