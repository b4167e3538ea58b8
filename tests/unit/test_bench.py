"""The benchmarks' own inputs: trafgen's dinc() cells must give exactly
the number of flows the report claims, by varying only the source address
and port (so every frame is still for the service); the profile's cuts and
the levers' edits must each find their place in xdp_lb.c exactly once, so
a change to the program cannot silently measure something else."""
import os
import re
import sys

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "bench"))
import forward  # noqa: E402
import packet  # noqa: E402

from ansible_collections.xvs.lb.plugins.module_utils import _loader  # noqa: E402


def frames(cfg, count):
    """What trafgen sends: each dinc(lo, hi, 1) cell counts from lo to hi
    and wraps, one step per packet."""
    cells = [c.strip() for c in cfg.strip()[1:-1].split(",")]
    merged, i = [], 0
    while i < len(cells):          # "dinc(a", "b", "1)" were split on commas
        if cells[i].startswith("dinc("):
            merged.append(tuple(int(re.sub(r"\D", "", c)) for c in cells[i:i + 3]))
            i += 3
        else:
            merged.append(int(cells[i], 16))
            i += 1
    for n in range(count):
        yield bytes(c if isinstance(c, int) else c[0] + n % (c[1] - c[0] + 1) for c in merged)


@pytest.mark.parametrize("flows", sorted(forward.FLOWS))
def test_trafgen_config_makes_exactly_the_flows_claimed(flows):
    sent = list(frames(forward.trafgen_config(flows), 2 * flows))
    for raw in sent[:300]:
        pkt = Ether(raw)
        assert len(raw) == 60 and pkt[IP].dst == forward.VIP and pkt[TCP].dport == 80
        assert pkt[TCP].flags == "A"
        assert raw[:26] + raw[30:34] + raw[36:] == sent[0][:26] + sent[0][30:34] + sent[0][36:]
    # bytes 26-29 are the source address, 34-35 the source port
    assert len({(raw[26:30], raw[34:36]) for raw in sent}) == flows


@pytest.mark.parametrize("stage", [m for dummy, m in packet.STAGES])
def test_profile_cut_is_in_the_program_once(stage):
    assert _loader.read_source().count(stage) == 1


@pytest.mark.parametrize("name", [n for n, dummy in packet.LEVERS])
def test_lever_edit_applies_once_and_changes_the_program(name):
    text = _loader.read_source()
    edits = dict(packet.LEVERS)[name]
    out = packet.variant(text, edits)        # raises unless each edit is found once
    assert (out != text) == bool(edits)
